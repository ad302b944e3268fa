"""A run folder fitted by stackcat 0.1: one clear refusal, whatever reads it, and nothing of it rewritten."""

from __future__ import annotations

import json
import re

import pytest

from stackcat import __version__
from stackcat.cli import EXIT_OK, EXIT_RUN_ERROR, main
from stackcat.data import TableSpec
from stackcat.runs import MANIFEST, OutdatedRunFolderError, RunFolder
from stackcat.stacking import STACKER_FILE, StackingCategorizer

from toy_models import NaiveBayesText, toy_table

REFUSAL = "fitted by stackcat 0.1: fit again; `--resume` reuses nothing"
SPEC = TableSpec(text_columns=["text"], target="label", id_column="id")


def set_version(run_dir, version):
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest["stackcat_version"] = version
    (run_dir / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def fitted_run(tmp_path):
    """A fitted run folder (this release's) and its training table as a CSV."""
    X, y = toy_table(n_per_class=6, n_classes=3)
    table = tmp_path / "train.csv"
    X.assign(label=y).to_csv(table, index=False)
    run_dir = tmp_path / "run"
    RunFolder(run_dir).record_table(SPEC.to_dict(), str(table))
    StackingCategorizer([("nb", NaiveBayesText())], meta="average", n_splits=3, run_dir=run_dir,
                        progress=False, verbose=0).fit(X, y)
    return run_dir, table


def folder_contents(run_dir):
    return {path: path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}


def test_loading_a_0_1_folder_is_refused_before_unpickling(fitted_run):
    run_dir, _ = fitted_run
    set_version(run_dir, "0.1.0")
    (run_dir / STACKER_FILE).write_bytes(b"not a pickle")  # read, it would fail with another message
    with pytest.raises(OutdatedRunFolderError, match=re.escape(REFUSAL)):
        StackingCategorizer.load(run_dir)
    with pytest.raises(OutdatedRunFolderError, match="manifest.json says stackcat 0.1.0"):
        RunFolder(run_dir).read_table_settings()


@pytest.mark.parametrize("command", ["predict", "evaluate", "evaluate on a table", "fit --resume"])
def test_every_command_on_a_0_1_folder_exits_1_with_the_one_message(fitted_run, tmp_path, capsys, command):
    run_dir, table = fitted_run
    set_version(run_dir, "0.1.3")
    before = folder_contents(run_dir)
    out = tmp_path / "predictions.csv"
    argv = {"predict": ["predict", str(run_dir), str(table), "--out", str(out)],
            "evaluate": ["evaluate", str(run_dir)],
            "evaluate on a table": ["evaluate", str(run_dir), str(table)],
            "fit --resume": ["fit", str(table), "--run-dir", str(run_dir), "--resume", "--models", "fasttext",
                             "--meta", "average", "--folds", "3", "--no-progress"]}[command]
    assert main(argv) == EXIT_RUN_ERROR
    err = capsys.readouterr().err
    assert REFUSAL in err and str(run_dir) in err
    assert "to continue" not in err  # no advice to resume what cannot be resumed
    assert folder_contents(run_dir) == before and not out.exists()


def test_a_folder_of_this_release_still_predicts(fitted_run, tmp_path):
    run_dir, table = fitted_run
    set_version(run_dir, f"{__version__}rc1")  # another version of the same format: read as it is
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run_dir), str(table), "--out", str(out)]) == EXIT_OK
    assert out.exists()


@pytest.mark.parametrize(("version", "refused"), [("0.0.9", True), ("0.1", True), ("0.2.0", False),
                                                  ("1.0.0", False), ("unknown", False)])
def test_only_releases_before_0_2_are_refused(fitted_run, version, refused):
    run_dir, _ = fitted_run
    set_version(run_dir, version)
    if refused:
        with pytest.raises(OutdatedRunFolderError, match=f"fitted by stackcat {version[:3]}:"):
            RunFolder(run_dir).read_manifest()
    else:
        assert RunFolder(run_dir).read_manifest()["stackcat_version"] == version
