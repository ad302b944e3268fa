"""The run folder from Python: the same files as ``stackcat fit``, without the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stackcat.data import TableSpec, prepare_table
from stackcat.report import unseen_labels_note, write_run_report
from stackcat.runs import (
    DATA_PROBLEMS,
    IMAGE_PROBLEMS,
    MANIFEST,
    TABLE_SETTINGS,
    RunFolder,
    RunFolderConflict,
    RunFolderError,
)
from stackcat.stacking import StackingCategorizer

from tiny_images import write_image, write_truncated_jpeg
from toy_models import NaiveBayesText, toy_table

SPEC = TableSpec(text_columns=["text"], target="label", id_column="id", image_column="image")


def table_with_images(folder):
    X, y = toy_table(n_per_class=6, n_classes=3, seed=1)
    raw = X.assign(label=y, image=None)
    raw.loc[0, "image"] = str(write_image(folder / "ok.png"))
    raw.loc[1, "image"] = str(write_truncated_jpeg(folder / "broken.jpg"))
    raw.loc[2, "image"] = str(folder / "missing.jpg")
    raw.loc[3, "text"] = ""  # a data problem: the row is left out
    return raw


def fitted(run_dir, prepared):
    stack = StackingCategorizer([("nb", NaiveBayesText())], meta="average", n_splits=3, run_dir=run_dir,
                                progress=False, verbose=0)
    return stack.fit(prepared.frame, prepared.frame["label"])


@pytest.mark.slow
def test_python_gets_the_run_folder_of_stackcat_fit(tmp_path):
    prepared = prepare_table(table_with_images(tmp_path / "images"), SPEC)
    run = RunFolder(tmp_path / "run")
    run.check_new_run()
    run.record_table(prepared.spec.to_dict(), "my table", prepared.problems())
    stack = fitted(run.path, prepared)
    report = write_run_report(stack, prepared, run.path, fit_seconds=1.0)

    for name in (MANIFEST, TABLE_SETTINGS, DATA_PROBLEMS, IMAGE_PROBLEMS, "report.md", "per_class_f1.csv"):
        assert (run.path / name).exists(), name
    assert TableSpec.from_dict(run.read_table_settings()["spec"]) == prepared.spec
    assert run.read_table_settings()["source"] == "my table"
    assert pd.read_csv(run.path / DATA_PROBLEMS)[["row", "column"]].values.tolist() == [[3, "text"]]
    problems = pd.read_csv(run.path / IMAGE_PROBLEMS)
    assert problems[["row", "status"]].values.tolist() == [[1, "corrupt"], [2, "missing"]]
    assert report.image_problems["status"].tolist() == ["corrupt", "missing"]
    text = report.path.read_text()
    assert "Images: corrupt 1, missing 1, no_path 14, ok 1. Unusable images are listed in" in text
    assert "Wall time of this fit: 1 s" in text and "problems listed in data_problems.csv" in text
    with pytest.raises(RunFolderConflict, match="already holds a run: pass --resume"):
        run.check_new_run()
    run.check_new_run(resume=True)


def test_a_table_without_images_gets_no_image_note(tmp_path):
    X, y = toy_table(n_per_class=6, n_classes=3)
    prepared = prepare_table(X.assign(label=y), TableSpec(text_columns=["text"], target="label"))
    report = write_run_report(fitted(tmp_path / "run", prepared), prepared, tmp_path / "run")
    assert report.image_problems is None and "Images:" not in report.path.read_text()
    assert not (tmp_path / "run" / IMAGE_PROBLEMS).exists()


def test_the_new_run_check_refuses_a_file_and_a_folder_of_other_files(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderConflict, match="is a file, not a folder"):
        RunFolder(tmp_path / "file").check_new_run()
    mine = tmp_path / "mine"
    mine.mkdir()
    for i in range(6):
        (mine / f"doc{i}.txt").write_text("x")
    with pytest.raises(RunFolderConflict, match=r"not empty \(doc0.txt, .*doc4.txt \.\.\.\)"):
        RunFolder(mine).check_new_run(resume=True)
    RunFolder(tmp_path / "new").check_new_run()
    (tmp_path / "empty").mkdir()
    RunFolder(tmp_path / "empty").check_new_run()
    assert issubclass(RunFolderConflict, RunFolderError)


def test_table_settings_are_refused_while_another_writer_holds_the_folder(tmp_path):
    run = RunFolder(tmp_path / "run")
    with run.locked(), pytest.raises(RunFolderError, match="is in use"):
        RunFolder(tmp_path / "run").record_table({"text_columns": ["text"]}, "t.csv")
    assert not (tmp_path / "run" / TABLE_SETTINGS).exists()
    with pytest.raises(FileNotFoundError, match=r"not a stackcat run folder \(no table.json\)"):
        run.read_table_settings()
    run.record_table({"text_columns": ["text"]}, "t.csv")
    assert json.loads((run.path / TABLE_SETTINGS).read_text())["source"] == "t.csv"
    assert (run.path / DATA_PROBLEMS).read_text().splitlines() == ["row,id,column,reason"]


def test_evaluation_leaves_out_the_rows_of_unseen_categories(tmp_path):
    X, y = toy_table(n_per_class=6, n_classes=3)
    prepared = prepare_table(X.assign(label=y), TableSpec(text_columns=["text"], target="label"))
    stack = fitted(None, prepared)
    labels = np.array(["new b", *y[1:4], "new a", "new b"], dtype=object)
    frame = prepared.frame.iloc[:6]
    assert stack.label_indices(labels).tolist()[:2] == [-1, stack.label_indices(y[1:2])[0]]

    evaluation = stack.evaluation_results(frame, pd.Series(labels))
    assert evaluation.scored.tolist() == [False, True, True, True, False, False]
    assert evaluation.unseen_labels == ["new a", "new b"] and evaluation.n_unseen_rows == 3
    assert evaluation.y_index.tolist() == stack.label_indices(y[1:4]).tolist()
    np.testing.assert_allclose(evaluation.results["meta:AverageBlend"], stack.predict_proba(frame.iloc[1:4]))
    assert unseen_labels_note(evaluation).startswith("3 rows of 2 categories unseen in training (new a, new b)")

    out = tmp_path / "evaluation"
    evaluated = prepare_table(frame.assign(label=labels)[["id", "text", "label"]],
                              TableSpec(text_columns=["text"], target="label", id_column="id"))
    report = write_run_report(stack, evaluated, out, evaluation=evaluation)
    text = report.path.read_text()
    assert "6 rows read, 3 kept" in text and "categories unseen in training" in text

    nothing = stack.evaluation_results(frame, ["new"] * len(frame))
    assert nothing.results == {} and not nothing.scored.any()
    with pytest.raises(ValueError, match="X has 6 rows but y has 2"):
        stack.evaluation_results(frame, ["a", "b"])


def test_the_report_compares_the_stack_with_its_best_member_not_a_meta_candidate(tmp_path, monkeypatch):
    X, y = toy_table(n_per_class=8, n_classes=3, seed=2)
    prepared = prepare_table(X.assign(label=y), TableSpec(text_columns=["text"], target="label"))
    stack = fitted(tmp_path / "run", prepared)
    results = stack.oof_results()
    headline = list(results)[-1]
    # an unchosen meta candidate that beats every member (perfect out of fold)
    perfect = np.eye(len(stack.classes_))[stack.oof_target_]
    candidates = {**{k: v for k, v in results.items() if k != headline}, "meta:Perfect": perfect,
                  headline: results[headline]}
    monkeypatch.setattr(stack, "oof_results", lambda: candidates)
    text = write_run_report(stack, prepared, tmp_path / "run").path.read_text()
    assert "vs the best single model (nb)" in text and "(meta:Perfect)" not in text
