from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import stackcat

ROOT = Path(__file__).parent.parent


def test_every_public_name_resolves():
    for name in stackcat.__all__:
        assert getattr(stackcat, name) is not None, name


def test_the_models_package_lists_each_estimator_once_and_resolves_it():
    import stackcat.models

    assert stackcat.models.__all__ == sorted(stackcat.models.__all__)
    assert set(stackcat.models.__all__) == {name for name in stackcat.__all__ if name.endswith("Classifier")}
    for name in stackcat.models.__all__:
        assert getattr(stackcat.models, name) is getattr(stackcat, name), name
    assert dir(stackcat.models) == stackcat.models.__all__


def test_import_is_light():
    code = "import sys, stackcat, stackcat.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_library_never_reads_the_shared_data_folder():
    offenders = [p for p in (ROOT / "stackcat").rglob("*.py") if "shared/data" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    commands = [line.split("#")[0].strip() for line in lines[:12] if line.startswith("make ")]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
