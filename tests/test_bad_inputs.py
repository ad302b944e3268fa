"""The bad-input matrix: each messy input gets a clear error or a reported recovery.

Every case goes through the CLI (``stackcat.cli.main``: exit code + message on
stderr) where it is a CLI concern. Cases already covered elsewhere are not
repeated here; docs/reliability.md lists the whole matrix and where each case
is tested.

The fits use the toy naive Bayes of ``toy_models``, registered as CLI model
``toy``: these tests are about the data, and fastText training is not
repeatable within a long-lived process (it can even diverge at random; see
docs/reliability.md), which would make them flaky.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stackcat import __version__
from stackcat.cli import EXIT_OK, EXIT_RUN_ERROR, EXIT_USAGE, main
from stackcat.data import TableSpec, prepare_table, read_table
from stackcat.runs import DATA_PROBLEMS, IMAGE_PROBLEMS, MANIFEST, RunFolder
from stackcat.stacking import StackingCategorizer

from tiny_images import write_huge_png, write_image, write_truncated_jpeg
from toy_models import toy_table, write_toy_csv

KE_CSV = Path(__file__).parent / "data" / "ke_products.csv"
FAST = ["--models", "toy", "--folds", "3", "--meta", "average", "--no-progress"]
FASTTEXT = ["--models", "fasttext", "--folds", "3", "--meta", "average", "--no-progress",
            "--param", "fasttext__n_threads=1", "--param", "fasttext__dim=16"]
GENERIC = ["--text-columns", "text", "--target", "label"]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


pytestmark = pytest.mark.usefixtures("toy_model_in_the_cli")


@pytest.fixture(scope="module")
def ke_run(tmp_path_factory):
    """The KazanExpress fixture, fitted once: (training table, run folder)."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    train = folder / "ke.csv"
    shutil.copy(KE_CSV, train)
    run_dir = folder / "run"
    assert main(["fit", str(train), "--run-dir", str(run_dir), *FAST]) == EXIT_OK
    return train, run_dir


@pytest.fixture
def ke_raw() -> pd.DataFrame:
    return pd.read_csv(KE_CSV, dtype=str)


# --------------------------------------------------------------------------- columns and files


def test_misnamed_target_column_is_named_with_a_hint(tmp_path, capsys):
    code, _, err = run_cli(["fit", KE_CSV, "--run-dir", tmp_path / "run", "--target", "category", *FAST], capsys)
    assert code == EXIT_RUN_ERROR
    assert "missing column(s) 'category' (did you mean 'category_id'?)" in err


def test_predict_table_without_a_column_the_run_uses_is_refused_by_name(ke_run, ke_raw, tmp_path, capsys):
    _, run_dir = ke_run
    table = tmp_path / "no-sale.csv"
    ke_raw.drop(columns=["sale", "category_id"]).to_csv(table, index=False)
    out = tmp_path / "predictions.csv"
    code, _, err = run_cli(["predict", run_dir, table, "--out", out], capsys)
    assert code == EXIT_RUN_ERROR
    assert "missing column(s) 'sale'" in err and "Traceback" not in err
    assert not out.exists()


def test_predict_ignores_column_order_and_extra_columns(ke_run, ke_raw, tmp_path, capsys):
    _, run_dir = ke_run
    plain, shuffled = tmp_path / "plain.csv", tmp_path / "shuffled.csv"
    test = ke_raw.drop(columns="category_id")
    test.to_csv(plain, index=False)
    extra = test[test.columns[::-1]].assign(notes="zzz unrelated words", title="not the title")
    extra.to_csv(shuffled, index=False)
    for table in (plain, shuffled):
        assert run_cli(["predict", run_dir, table, "--out", table.with_suffix(".out")], capsys)[0] == EXIT_OK
    assert plain.with_suffix(".out").read_bytes() == shuffled.with_suffix(".out").read_bytes()


def test_semicolon_separated_export_is_read(ke_raw, tmp_path, capsys):
    table = tmp_path / "excel-export.csv"
    ke_raw.to_csv(table, index=False, sep=";")
    assert read_table(table).columns.tolist() == ke_raw.columns.tolist()
    code, out, _ = run_cli(["fit", table, "--run-dir", tmp_path / "run", *FAST], capsys)
    assert code == EXIT_OK and "36 rows read, 33 kept" in out


def test_utf8_byte_order_mark_does_not_hide_the_first_column(tmp_path, capsys):
    table = tmp_path / "bom.csv"
    table.write_bytes(b"\xef\xbb\xbf" + KE_CSV.read_bytes())
    assert read_table(table).columns[0] == "product_id"
    code, out, _ = run_cli(["fit", table, "--run-dir", tmp_path / "run", *FAST], capsys)
    assert code == EXIT_OK and "36 rows read, 33 kept" in out


def test_broken_row_met_mid_file_while_predicting_names_file_and_line(ke_run, ke_raw, tmp_path, capsys):
    _, run_dir = ke_run
    table = tmp_path / "broken.csv"
    lines = ke_raw.drop(columns="category_id").to_csv(index=False).splitlines(keepends=True)
    lines.insert(30, "1,2,3,4,5,6,7,8,9\n")  # too many fields, after the first chunk
    table.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "predictions.csv"
    code, _, err = run_cli(["predict", run_dir, table, "--out", out, "--chunk-rows", "10"], capsys)
    assert code == EXIT_RUN_ERROR
    assert f"{table}: not a well-formed CSV table" in err and "line 31" in err
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"product_id,text_fields,shop_title,sale\n"])
def test_empty_table_to_predict_leaves_earlier_predictions_alone(ke_run, tmp_path, capsys, content):
    _, run_dir = ke_run
    table, out = tmp_path / "empty.csv", tmp_path / "predictions.csv"
    table.write_bytes(content)
    out.write_text("earlier predictions\n")
    code, _, err = run_cli(["predict", run_dir, table, "--out", out], capsys)
    assert code == EXIT_RUN_ERROR
    assert f"{table}: the file is empty" in err or f"{table}: the table has a header but no rows" in err
    assert out.read_text() == "earlier predictions\n"


def test_non_utf8_bytes_at_predict_are_reported_by_line_and_predicted(ke_run, ke_raw, tmp_path, capsys):
    _, run_dir = ke_run
    table = tmp_path / "latin1.csv"
    csv = ke_raw.drop(columns="category_id").to_csv(index=False).encode("utf-8")
    table.write_bytes(csv.replace(b"Aksik", "Aks\xefk".encode("latin-1"), 1))
    out = tmp_path / "predictions.csv"
    with pytest.warns(UserWarning, match=r"not UTF-8 on line\(s\) 2;"):
        code, _, _ = run_cli(["predict", run_dir, table, "--out", out], capsys)
    assert code == EXIT_OK and len(pd.read_csv(out)) == 36


# --------------------------------------------------------------------------- rows and labels


def test_target_without_any_value_is_refused_with_the_rows(ke_raw, tmp_path, capsys):
    table = tmp_path / "unlabelled.csv"
    ke_raw.assign(category_id="").to_csv(table, index=False)
    code, _, err = run_cli(["fit", table, "--run-dir", tmp_path / "run", *FAST], capsys)
    assert code == EXIT_RUN_ERROR
    assert "no usable training rows: each of the 36 rows has a problem" in err
    assert "row 0 (id '100001'), column 'category_id': missing target" in err


def test_a_single_category_is_refused(ke_raw, tmp_path, capsys):
    table = tmp_path / "one-category.csv"
    ke_raw.assign(category_id="11937").to_csv(table, index=False)
    code, _, err = run_cli(["fit", table, "--run-dir", tmp_path / "run", *FAST], capsys)
    assert code == EXIT_RUN_ERROR and "single category ('11937')" in err


def test_a_class_with_one_member_is_kept_by_the_cli(ke_raw, tmp_path, capsys):
    table = tmp_path / "singleton.csv"
    ke_raw.assign(category_id=lambda f: f["category_id"].mask(f["product_id"] == "100001", "777")).to_csv(
        table, index=False)
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(["fit", table, "--run-dir", run_dir, "--models", "toy", "--folds", "3",
                            "--meta", "multiclass", "--no-progress"], capsys)
    assert code == EXIT_OK and "5 categories" in out
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert "777" in manifest["classes"] and manifest["rare_classes"] == ["777"]
    assert "1 classes with fewer than 3 rows" in (run_dir / "report.md").read_text()
    assert run_cli(["predict", run_dir, table, "--out", tmp_path / "predictions.csv"], capsys)[0] == EXIT_OK
    stack = StackingCategorizer.load(run_dir)
    frame = pd.DataFrame({"text": ["Зарядный кабель Borofone BX1 Lightning"], "title": [""]})
    column = list(stack.classes_).index("777")
    assert stack.predict_base_proba(frame)["toy"][0, column] > 0  # 2 of the 3 fold models learnt it


def test_whitespace_only_text_left_out_of_training_and_predicted_anyway(tmp_path, capsys):
    X, _ = toy_table(n_per_class=8)
    text = X["text"].copy()
    text[[3, 17]] = ["   ", "\t \n"]
    train = write_toy_csv(tmp_path / "train.csv", text=text)
    run_dir = tmp_path / "run"
    assert run_cli(["fit", train, "--run-dir", run_dir, "--id-column", "id", *GENERIC, *FAST], capsys)[0] == EXIT_OK
    problems = pd.read_csv(run_dir / DATA_PROBLEMS)
    assert problems[["id", "column", "reason"]].values.tolist() == [[3, "text", "empty product text"],
                                                                    [17, "text", "empty product text"]]
    out = tmp_path / "predictions.csv"
    code, _, err = run_cli(["predict", run_dir, train, "--out", out], capsys)
    assert code == EXIT_OK
    assert "row 3 (id '3'), column 'text': empty product text" in err
    assert len(pd.read_csv(out)) == len(X)


def test_duplicate_ids_at_predict_are_reported_and_both_rows_predicted(ke_run, ke_raw, tmp_path, capsys):
    _, run_dir = ke_run
    table = tmp_path / "duplicates.csv"
    test = ke_raw.drop(columns="category_id")
    test.loc[30, "product_id"] = test.loc[2, "product_id"]
    test.to_csv(table, index=False)
    out = tmp_path / "predictions.csv"
    code, _, err = run_cli(["predict", run_dir, table, "--out", out], capsys)
    assert code == EXIT_OK
    assert "row 30 (id '100003'), column 'product_id': duplicate product id (first seen at row 2)" in err
    assert (pd.read_csv(out, dtype=str)["product_id"] == "100003").sum() == 2


def test_chunked_predict_numbers_rows_across_the_whole_file(tmp_path, capsys):
    X, _ = toy_table(n_per_class=8)
    text = X["text"].copy()
    text[25] = " "
    train = write_toy_csv(tmp_path / "train.csv", text=text)
    run_dir = tmp_path / "run"
    assert run_cli(["fit", train, "--run-dir", run_dir, *GENERIC, *FAST], capsys)[0] == EXIT_OK
    out = tmp_path / "predictions.csv"
    code, _, err = run_cli(["predict", run_dir, train, "--out", out, "--chunk-rows", "10"], capsys)
    assert code == EXIT_OK
    assert "row 25 (id 25), column 'text': empty product text" in err  # not "row 5" of the 3rd chunk
    assert pd.read_csv(out)["row"].tolist() == list(range(len(X)))  # ids without an id column: file rows


def test_evaluate_with_no_category_known_to_the_run(ke_run, ke_raw, tmp_path, capsys):
    _, run_dir = ke_run
    table = tmp_path / "other-catalogue.csv"
    ke_raw.assign(category_id="424242").to_csv(table, index=False)
    code, _, err = run_cli(["evaluate", run_dir, table], capsys)
    assert code == EXIT_RUN_ERROR
    assert "no row has a category seen in training" in err and "Traceback" not in err


# --------------------------------------------------------------------------- Parquet


def test_parquet_struct_and_list_columns_are_rendered_and_predicted_in_chunks(tmp_path, capsys):
    X, y = toy_table(n_per_class=8)
    fields = [{"title": text, "description": f"about {text}", "attributes": ["size: M", f"kind: {label}"]}
              for text, label in zip(X["text"], y)]
    frame = pd.DataFrame({"product_id": X["id"].astype(str), "text_fields": fields, "category_id": y,
                          "tags": [["new", "sale"] if i % 2 else [] for i in range(len(X))]})
    table = tmp_path / "products.parquet"
    frame.to_parquet(table)
    prepared = prepare_table(read_table(table), TableSpec.detect(frame.columns, attribute_columns=["tags"]))
    first = prepared.frame.iloc[1]
    assert first["title"] == X["text"][1]
    assert first["text"] == f"{X['text'][1]}. about {X['text'][1]}. size: M, kind: {y[1]}. tags: new, sale"
    run_dir = tmp_path / "run"
    assert run_cli(["fit", table, "--run-dir", run_dir, "--attribute-columns", "tags", *FAST], capsys)[0] == EXIT_OK
    out = tmp_path / "predictions.csv"
    assert run_cli(["predict", run_dir, table, "--out", out, "--chunk-rows", "7"], capsys)[0] == EXIT_OK
    assert pd.read_csv(out, dtype=str)["product_id"].tolist() == frame["product_id"].tolist()


@pytest.mark.parametrize("column", ["sku", "label"])
def test_nested_ids_or_categories_are_refused_by_column(tmp_path, capsys, column):
    X, y = toy_table(n_per_class=4)
    frame = pd.DataFrame({"text": X["text"], "sku": X["id"].astype(str), "label": y})
    frame[column] = [[value] for value in frame[column]]
    table = tmp_path / "nested.parquet"
    frame.to_parquet(table)
    code, _, err = run_cli(["fit", table, "--run-dir", tmp_path / "run", *GENERIC, "--id-column", "sku", *FAST],
                           capsys)
    assert code == EXIT_RUN_ERROR
    assert f"column {column!r} holds nested values (lists or structs) at row(s) 0, 1, 2" in err


# --------------------------------------------------------------------------- images


def test_unusable_images_are_listed_by_row_id_and_file(tmp_path, capsys):
    folder = tmp_path / "images"
    files = {
        "ok": write_image(folder / "ok.png"),
        "cmyk": write_image(folder / "cmyk.jpg", mode="CMYK", colour=(0, 255, 255, 0), fmt="JPEG"),
        "grey": write_image(folder / "grey.png", mode="L", colour=90),
        "alpha": write_image(folder / "alpha.png", mode="RGBA", colour=(0, 0, 255, 40)),
        "truncated": write_truncated_jpeg(folder / "truncated.jpg"),
        "bomb": write_huge_png(folder / "bomb.png"),  # 10,000 x 10,000
        "missing": folder / "missing.jpg",
    }
    X, _ = toy_table(n_per_class=8)
    images = [files[k].name for k in files] + [None] * (len(X) - len(files))
    train = write_toy_csv(tmp_path / "train.csv", image=images)
    run_dir = tmp_path / "run"
    code, _, err = run_cli(["fit", train, "--run-dir", run_dir, "--id-column", "id", "--image-column", "image",
                            "--image-dir", "images", *GENERIC, *FAST], capsys)
    assert code == EXIT_OK
    problems = pd.read_csv(run_dir / IMAGE_PROBLEMS)
    assert problems[["id", "status"]].values.tolist() == [[4, "corrupt"], [5, "too_large"], [6, "missing"]]
    assert problems["image_path"].tolist() == [str(files[k]) for k in ("truncated", "bomb", "missing")]
    assert f"row 4 (id '4'), image {files['truncated']}: corrupt" in err
    assert "Images: corrupt 1, missing 1, no_path 25, ok 4, too_large 1." in (run_dir / "report.md").read_text()


# --------------------------------------------------------------------------- run folders and arguments


def test_run_folder_from_another_version_warns_and_reuses_finished_jobs(ke_run, tmp_path, capsys):
    train, fitted = ke_run
    run_dir = tmp_path / "old-run"
    shutil.copytree(fitted, run_dir)
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest["stackcat_version"] = manifest["versions"]["stackcat"] = "0.2.0rc1"  # same format, other version
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=rf"other library versions \(stackcat 0\.2\.0rc1 -> {__version__}\)"):
        code, out, _ = run_cli(["fit", train, "--run-dir", run_dir, "--resume", *FAST], capsys)
    assert code == EXIT_OK and "3 of 3 jobs already done" in out
    assert json.loads((run_dir / MANIFEST).read_text())["versions"]["stackcat"] == __version__


def test_run_dir_that_is_not_a_run_folder_is_refused(tmp_path, capsys):
    foreign = tmp_path / "my-documents"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    code, _, err = run_cli(["fit", KE_CSV, "--run-dir", foreign, "--resume", *FAST], capsys)
    assert code == EXIT_USAGE and "is not a stackcat run folder and is not empty (thesis.docx)" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.docx"]
    a_file = tmp_path / "run.txt"
    a_file.write_text("x")
    code, _, err = run_cli(["fit", KE_CSV, "--run-dir", a_file, *FAST], capsys)
    assert code == EXIT_USAGE and "is a file, not a folder" in err


def test_damaged_manifest_is_named(ke_run, tmp_path, capsys):
    train, fitted = ke_run
    run_dir = tmp_path / "run"
    shutil.copytree(fitted, run_dir)
    (run_dir / MANIFEST).write_text('{"status": "runn')
    code, _, err = run_cli(["fit", train, "--run-dir", run_dir, "--resume", *FAST], capsys)
    assert code == EXIT_RUN_ERROR and f"{run_dir / MANIFEST}: unreadable manifest" in err


def test_run_folder_in_use_is_refused(ke_run, tmp_path, capsys):
    train, fitted = ke_run
    run_dir = tmp_path / "run"
    shutil.copytree(fitted, run_dir)
    files_before = {p: p.stat().st_ino for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    with RunFolder(run_dir).locked():
        code, _, err = run_cli(["fit", train, "--run-dir", run_dir, "--resume", *FAST], capsys)
    assert code == EXIT_RUN_ERROR and "is in use by pid" in err and "finished jobs are kept" in err
    files_after = {p: p.stat().st_ino for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert files_after == files_before  # not one file of the other fit's folder rewritten


@pytest.mark.parametrize(("extra", "message"), [
    (["--param", "bert__lr=3e-5"], "--param 'bert__lr=3e-5': expected MODEL__NAME=VALUE with MODEL in ['fasttext']"),
    (["--param", "fasttext__learning_rate=0.1"], "Invalid parameter 'learning_rate' for estimator FastTextClassifier"),
    (["--models", "fasttext,xgboost"], "unknown model(s) ['xgboost']"),
    (["--param", "fasttext__lr=-1"], "model 'fasttext': The 'lr' parameter of FastTextClassifier must be"),
    (["--param", "fasttext__epoch=many"], "model 'fasttext': The 'epoch' parameter of FastTextClassifier must be"),
])
def test_model_arguments_that_cannot_work_are_usage_errors(tmp_path, capsys, extra, message):
    code, _, err = run_cli(["fit", KE_CSV, "--run-dir", tmp_path / "run", *FASTTEXT, *extra], capsys)
    assert code == EXIT_USAGE and message in err
    assert not (tmp_path / "run" / MANIFEST).exists()


@pytest.mark.slow
def test_fasttext_bucket_zero_with_ngrams_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stackcat.cli", "fit", str(KE_CSV), "--run-dir",
                             str(tmp_path / "run"), *FASTTEXT, "--param", "fasttext__bucket=0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode in (EXIT_RUN_ERROR, EXIT_USAGE), result.returncode
    assert "bucket" in result.stderr


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("False", False), ("none", None), ("null", None), ("3e-5", 3e-5), ("20", 20),
    ("(1, 2)", (1, 2)), ("'auto'", "auto"), ("auto", "auto"), ("passage: ", "passage: "),
])
def test_param_values_are_read_like_a_user_writes_them(text, value):
    from stackcat.cli import _literal

    assert _literal(text) == value and type(_literal(text)) is type(value)
