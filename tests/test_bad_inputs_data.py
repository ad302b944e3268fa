"""The second bad-input round (issue 12), data side: ids, labels, encodings, the review queue.

Like test_bad_inputs.py, the fits use the toy naive Bayes registered as CLI
model ``toy`` (fast, exactly repeatable); docs/reliability.md lists each case.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from stackcat.cli import EXIT_OK, EXIT_RUN_ERROR, EXIT_USAGE, main
from stackcat.data import (
    DataError,
    TableSpec,
    prepare_table,
    read_table,
    read_table_chunks,
    text_encoding,
)
from stackcat.review import review_marks, review_threshold
from stackcat.runs import DATA_PROBLEMS, MANIFEST
from stackcat.stacking import StackingCategorizer

from toy_models import toy_table

FAST = ["--models", "toy", "--folds", "3", "--meta", "average", "--no-progress"]
GENERIC = ["--text-columns", "text", "--target", "label"]
NA_WORDS = ["NA", "null", "None", "N/A", "nan", "#N/A", "NULL"]

pytestmark = pytest.mark.usefixtures("toy_model_in_the_cli")


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def toy_frame(n_per_class: int = 8) -> pd.DataFrame:
    X, y = toy_table(n_per_class=n_per_class)
    return X.assign(id=X["id"].astype(str), label=y)


# --------------------------------------------------------------------------- missing ids (defect 3)


def test_missing_ids_get_a_row_id_and_words_like_na_stay_ids_in_fit_and_predict(tmp_path, capsys):
    frame = toy_frame()
    frame.loc[3, "id"] = ""
    frame.loc[5:5 + len(NA_WORDS) - 1, "id"] = NA_WORDS
    table = tmp_path / "train.csv"
    frame.to_csv(table, index=False)
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(["fit", table, "--run-dir", run_dir, "--id-column", "id", *GENERIC, *FAST], capsys)
    assert code == EXIT_OK
    assert f"{len(frame)} rows read, {len(frame)} kept, 1 row problem(s)" in out  # the row is kept
    problems = pd.read_csv(run_dir / DATA_PROBLEMS, dtype=str, keep_default_na=False)
    assert problems[["row", "id", "column"]].values.tolist() == [["3", "row-3", "id"]]
    assert "missing product id; the row is kept under the id 'row-3'" in problems["reason"][0]
    out_csv = tmp_path / "predictions.csv"
    code, _, err = run_cli(["predict", run_dir, table, "--out", out_csv], capsys)
    assert code == EXIT_OK
    assert "row 3 (id 'row-3'), column 'id': missing product id" in err
    ids = pd.read_csv(out_csv, dtype=str, keep_default_na=False)["id"].tolist()
    assert ids[3] == "row-3" and ids[5:5 + len(NA_WORDS)] == NA_WORDS


def test_missing_parquet_id_and_a_chunk_get_row_ids_numbered_in_the_file(tmp_path):
    frame = pd.DataFrame({"sku": ["a", None, "c", None], "text": ["x y", "y z", "z x", "x x"]})
    path = tmp_path / "t.parquet"
    frame.to_parquet(path)
    chunks = list(read_table_chunks(path, chunk_rows=3))
    spec = TableSpec(text_columns=["text"], id_column="sku")
    ids = [prepare_table(chunk, spec, with_target=False).frame["id"].tolist() for chunk in chunks]
    assert ids == [["a", "row-1", "c"], ["row-3"]]


# --------------------------------------------------------------------------- NA words (defect 4)


def test_words_that_pandas_reads_as_missing_keep_their_value(tmp_path, capsys):
    frame = toy_frame()
    frame["label"] = frame["label"].replace({"class 0": "None", "class 1": "NA"})
    frame.loc[0, "text"], frame.loc[1, "text"], frame.loc[2, "text"] = "NULL", "None", "NA"
    frame.loc[4, "label"] = ""  # a truly empty cell is still missing
    table = tmp_path / "train.csv"
    frame.to_csv(table, index=False)
    raw = read_table(table)
    assert raw["text"][:3].tolist() == ["NULL", "None", "NA"]
    prepared = prepare_table(raw, TableSpec(text_columns=["text"], target="label"))
    assert prepared.frame["text"][:3].tolist() == ["NULL", "None", "NA"]
    assert (prepared.frame["label"] == "None").sum() == (frame["label"] == "None").sum()
    assert [(e.row, e.reason) for e in prepared.errors] == [(4, "missing target")]
    run_dir = tmp_path / "run"
    assert run_cli(["fit", table, "--run-dir", run_dir, *GENERIC, *FAST], capsys)[0] == EXIT_OK
    assert {"None", "NA"} <= set(json.loads((run_dir / MANIFEST).read_text())["classes"])


# --------------------------------------------------------------------------- label spelling (defect 6)


def test_labels_are_stripped_and_nfc_normalized_and_merges_are_named():
    cafe_composed, cafe_decomposed = "Caf\u00e9", unicodedata.normalize("NFD", "Caf\u00e9")
    raw = pd.DataFrame({"t": list("abcdef"),
                        "y": ["Shirts ", "Shirts", " Shirts", cafe_composed, cafe_decomposed, "Jeans"]})
    with pytest.warns(UserWarning) as caught:
        prepared = prepare_table(raw, TableSpec(text_columns=["t"], target="y"))
    assert prepared.frame["label"].tolist() == ["Shirts"] * 3 + [cafe_composed] * 2 + ["Jeans"]
    message = str(caught[0].message)
    assert "target column 'y'" in message and "' Shirts' + 'Shirts' + 'Shirts ' -> 'Shirts'" in message
    assert cafe_decomposed in message


def test_labels_without_other_spellings_do_not_warn(recwarn):
    prepare_table(pd.DataFrame({"t": ["a", "b"], "y": ["Shirts", "Jeans"]}), TableSpec(text_columns=["t"], target="y"))
    assert not [w for w in recwarn if "labels that differ" in str(w.message)]


# --------------------------------------------------------------------------- label types (defect 7)


def test_a_run_fit_on_parquet_int_labels_evaluates_the_csv_of_the_same_table(tmp_path, capsys):
    frame = toy_frame().assign(label=lambda f: f["label"].str.removeprefix("class ").astype(int) + 1)
    frame.loc[7, "label"] = None  # a NaN-holed integer column: floats in pandas, "1.0" in its CSV
    parquet, csv = tmp_path / "t.parquet", tmp_path / "t.csv"
    frame.to_parquet(parquet)
    frame.to_csv(csv, index=False)
    assert pd.read_csv(csv, dtype=str)["label"][0].endswith(".0")
    run_dir = tmp_path / "run"
    assert run_cli(["fit", parquet, "--run-dir", run_dir, *GENERIC, *FAST], capsys)[0] == EXIT_OK
    assert json.loads((run_dir / MANIFEST).read_text())["classes"] == ["1", "2", "3", "4"]
    assert StackingCategorizer.load(run_dir).classes_.tolist() == ["1", "2", "3", "4"]
    code, out, err = run_cli(["evaluate", run_dir, csv], capsys)
    assert code == EXIT_OK and "unseen" not in err
    assert f"{len(frame)} rows read, {len(frame) - 1} kept" in out


# --------------------------------------------------------------------------- files (defect 9)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_duplicate_column_names_are_refused_by_name(tmp_path, capsys, suffix):
    table = tmp_path / f"dup{suffix}"
    if suffix == ".csv":
        table.write_text("id,text,label,text\n1,a b,x,c d\n2,b c,y,d e\n", encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table([["1", "2"], ["a", "b"], ["x", "y"], ["c", "d"]],
                                names=["id", "text", "label", "text"]), table)
    with pytest.raises(DataError, match=r"duplicate column name\(s\): 'text' is columns 2, 4"):
        read_table(table)
    code, _, err = run_cli(["fit", table, "--run-dir", tmp_path / "run", *GENERIC, *FAST], capsys)
    assert code == EXIT_RUN_ERROR and f"{table}: duplicate column name(s): 'text' is columns 2, 4" in err


def test_duplicate_column_names_in_a_dataframe_are_refused():
    raw = pd.DataFrame([["a", "x", "b"]], columns=["text", "label", "text"])
    with pytest.raises(DataError, match="'text' is columns 1, 3"):
        prepare_table(raw, TableSpec(text_columns=["text"], target="label"))


@pytest.mark.parametrize("encoding, expected", [
    ("utf-16", "utf-16"), ("utf-16-le", "utf-16-le"), ("utf-16-be", "utf-16-be"), ("utf-32", "utf-32"),
])
def test_utf16_and_utf32_tables_are_decoded(tmp_path, capsys, encoding, expected):
    frame = toy_frame().assign(text=lambda f: f["text"] + " Кабель")
    table = tmp_path / "wide.csv"
    table.write_bytes(frame.to_csv(index=False).encode(encoding))
    assert text_encoding(table) == expected
    raw = read_table(table)
    assert raw.columns.tolist() == ["id", "text", "label"]
    assert raw["text"].tolist() == frame["text"].tolist()
    assert [len(c) for c in read_table_chunks(table, chunk_rows=10)] == [10, 10, 10, 2]
    assert run_cli(["fit", table, "--run-dir", tmp_path / "run", *GENERIC, *FAST], capsys)[0] == EXIT_OK


def test_a_binary_file_named_csv_is_refused_with_what_it_is(tmp_path):
    table = tmp_path / "book.csv"
    table.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00" * 40)
    with pytest.raises(DataError, match="NUL bytes but is not UTF-16 text: is it a binary file"):
        read_table(table)


def test_out_equal_to_the_table_to_predict_is_a_usage_error(tmp_path, capsys, monkeypatch):
    table = tmp_path / "train.csv"
    toy_frame().to_csv(table, index=False)
    run_dir = tmp_path / "run"
    assert run_cli(["fit", table, "--run-dir", run_dir, *GENERIC, *FAST], capsys)[0] == EXIT_OK
    before = table.read_bytes()
    monkeypatch.chdir(tmp_path)
    for out in (table, Path("train.csv"), Path("sub/../train.csv")):
        code, _, err = run_cli(["predict", run_dir, table, "--out", out], capsys)
        assert code == EXIT_USAGE and "is the table to predict: it would be overwritten" in err
    assert table.read_bytes() == before


# --------------------------------------------------------------------------- review queue


def test_predict_marks_rows_for_review_at_the_run_oof_threshold(tmp_path, capsys):
    table = tmp_path / "train.csv"
    toy_frame(n_per_class=12).to_csv(table, index=False)
    run_dir = tmp_path / "run"
    assert run_cli(["fit", table, "--run-dir", run_dir, *GENERIC, *FAST], capsys)[0] == EXIT_OK
    stack = StackingCategorizer.load(run_dir)
    for precision in (0.9, 0.99):
        expected = review_threshold(stack, precision)
        out = tmp_path / f"predictions-{precision}.csv"
        code, stdout, err = run_cli(["predict", run_dir, table, "--out", out, "--precision", precision,
                                     "--chunk-rows", "20"], capsys)
        assert code == EXIT_OK
        predictions = pd.read_csv(out)
        raw = stack.predict_proba(prepare_table(read_table(table), TableSpec(text_columns=["text"]),
                                                with_target=False).frame).max(axis=1)
        assert predictions["review"].tolist() == review_marks(raw, expected.threshold).tolist()
        auto = int((predictions["review"] == "auto").sum())
        assert 0 < auto < len(predictions)
        assert f"{auto:,} ({auto / len(predictions):.1%}) auto-accepted" in stdout
        assert f"probability >= {expected.threshold:.4f}" in err


@pytest.mark.parametrize("precision", [0.0, 1.5, -1.0])
def test_precision_outside_zero_one_is_a_usage_error(tmp_path, capsys, precision):
    code, _, err = run_cli(["predict", tmp_path / "run", tmp_path / "t.csv", "--out", tmp_path / "o.csv",
                            "--precision", precision], capsys)
    assert code == EXIT_USAGE and "--precision" in err


def oof_stack(oof: np.ndarray, truth: list[int], meta_oof: np.ndarray | None = None, **more) -> SimpleNamespace:
    return SimpleNamespace(meta_oof_=meta_oof, meta_=SimpleNamespace(), oof_={"ft": oof, **more},
                           oof_target_=np.array(truth))


def test_review_threshold_is_the_lowest_probability_that_keeps_the_precision():
    oof = np.array([[0.95, 0.05], [0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    found = review_threshold(oof_stack(oof, [0, 0, 1, 1, 0]), precision=0.99)
    assert (found.threshold, found.oof_coverage, found.oof_precision) == (0.8, 0.6, 1.0)
    assert found.source == "ft" and found.reachable and "probability >= 0.8000" in found.describe()
    relaxed = review_threshold(oof_stack(oof, [0, 0, 1, 1, 0]), precision=0.75)
    assert (relaxed.threshold, relaxed.oof_coverage) == (0.6, 1.0)


def test_review_threshold_that_cannot_be_reached_sends_every_row_to_review():
    oof = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])
    found = review_threshold(oof_stack(oof, [1, 0, 0]), precision=0.99)  # the surest prediction is wrong
    assert not found.reachable and found.oof_precision == pytest.approx(2 / 3)
    assert "precision 0.99 cannot be reached" in found.describe() and "lower --precision" in found.describe()
    assert set(review_marks(np.array([1.0, 0.99]), found.threshold)) == {"review"}


def test_review_threshold_reads_the_meta_oof_else_the_average():
    a, b = np.array([[0.9, 0.1], [0.4, 0.6]]), np.array([[0.5, 0.5], [0.2, 0.8]])
    averaged = review_threshold(oof_stack(a, [0, 1], bt=b), precision=1.0)
    assert averaged.source == "average" and averaged.threshold == pytest.approx(0.7)
    meta = review_threshold(oof_stack(a, [0, 1], meta_oof=np.array([[0.99, 0.01], [0.3, 0.7]]), bt=b), 1.0)
    assert meta.source == "meta:SimpleNamespace" and meta.threshold == pytest.approx(0.7)
    assert meta.oof_coverage == 1.0


def test_predict_says_when_the_precision_cannot_be_reached(tmp_path, capsys, monkeypatch):

    table = tmp_path / "train.csv"
    toy_frame().to_csv(table, index=False)
    run_dir = tmp_path / "run"
    assert run_cli(["fit", table, "--run-dir", run_dir, *GENERIC, *FAST], capsys)[0] == EXIT_OK
    from stackcat.predictor import Predictor

    load = Predictor.load.__func__

    def run_whose_surest_oof_predictions_are_wrong(cls, path, **options):
        predictor = load(cls, path, **options)
        stack = predictor.stack
        wrong = (stack.oof_target_ + 1) % len(stack.classes_)
        stack.meta_oof_ = np.eye(len(stack.classes_), dtype=np.float32)[wrong]
        return Predictor.from_stack(stack, predictor.spec, precision=options.get("precision", 0.99))

    monkeypatch.setattr(Predictor, "load", classmethod(run_whose_surest_oof_predictions_are_wrong))
    out = tmp_path / "predictions.csv"
    code, stdout, err = run_cli(["predict", run_dir, table, "--out", out], capsys)
    assert code == EXIT_OK
    assert "precision 0.99 cannot be reached" in err and "every row is marked for review" in err
    assert "0 (0.0%) auto-accepted" in stdout and "precision 0.99 is not reached out of fold" in stdout
    assert set(pd.read_csv(out)["review"]) == {"review"}
