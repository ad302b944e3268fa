"""``stackcat label-issues RUN``: the run's suspected label errors and look-alike categories, printed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_label_issues import first_row_of_each_class, fit_stack, swap_labels, words_table

from stackcat.cli import EXIT_OK, EXIT_RUN_ERROR, EXIT_USAGE, main
from stackcat.data import TableSpec, prepare_table
from stackcat.label_issues import LABEL_ISSUES
from stackcat.lookalikes import LOOKALIKES
from stackcat.report import catalogue_sections


@pytest.fixture
def run_with_issues(tmp_path):
    raw = words_table(["Towel", "Towels", "Rugs"], n_per_class=12)
    raw["id"] = [f"id-{i}\nline two" if i == 0 else f"id-{i}" for i in range(len(raw))]
    swapped = first_row_of_each_class(raw)
    prepared = prepare_table(swap_labels(raw, swapped), TableSpec(text_columns=["text"], target="label",
                                                                   id_column="id"))
    catalogue_sections(fit_stack(prepared.frame), prepared, tmp_path)
    return tmp_path, raw.loc[swapped, "id"].tolist()


def test_it_prints_the_most_suspect_first(run_with_issues, capsys):
    run_dir, swapped_ids = run_with_issues
    assert main(["label-issues", str(run_dir), "--top", "3"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "suspected label errors in" in out and "look-alike category pairs in" in out
    listed = out.split("look-alike")[0]
    for swapped in swapped_ids:
        assert swapped.replace("\n", "\\n") in listed  # one product per printed line
    assert "line two" not in out.replace("\\nline two", "")


def test_missing_files_and_a_bad_top_are_named(tmp_path, capsys):
    assert main(["label-issues", str(tmp_path)]) == EXIT_RUN_ERROR
    err = capsys.readouterr().err
    assert f"{tmp_path / LABEL_ISSUES}, {tmp_path / LOOKALIKES} not found" in err and "--resume" in err
    assert main(["label-issues", str(tmp_path), "--top", "0"]) == EXIT_USAGE
    assert "--top 0: expected a number of rows >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_then_label_issues_end_to_end(tmp_path, capsys):
    train = tmp_path / "ke.csv"
    shutil.copy(Path(__file__).parent / "data" / "ke_products.csv", train)
    fast = ["--models", "fasttext", "--folds", "3", "--meta", "average", "--no-progress",
            "--param", "fasttext__n_threads=1", "--param", "fasttext__dim=16"]
    assert main(["fit", str(train), "--run-dir", str(tmp_path / "run"), *fast]) == EXIT_OK
    assert "## Suspected label errors" in (tmp_path / "run" / "report.md").read_text()
    capsys.readouterr()
    assert main(["label-issues", str(tmp_path / "run")]) == EXIT_OK
    assert "suspected label errors in" in capsys.readouterr().out
