"""Issue 20 (fail in seconds, never degrade in silence) and issue 19 item 4 (predict without a photo column).

Each class of problem of docs/reliability.md rows 55 and up has its tests here:
a degraded prediction says so, a cluster address that is not a scheduler fails
fast, checks that depend only on the table, the flags and the environment run
before the first (model, fold) job, and input whose meaning is wrong is refused
or named.
"""

from __future__ import annotations

import http.server
import threading
import warnings

import numpy as np
import pandas as pd
import pytest

from stackcat.cli import EXIT_OK, EXIT_RUN_ERROR, image_problems_path, main
from stackcat.data import DataError, TableSpec
from stackcat.predictor import Predictor
from stackcat.stacking import StackingCategorizer

from tiny_images import write_image
from toy_models import NaiveBayesText, toy_table


class ImageReadingText(NaiveBayesText):
    """A toy member that declares the image column as an input (as the image and fusion members do)."""

    file_columns = ("image_path",)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- a degraded prediction says so


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A stack with a member that reads images, fitted on rows whose photos exist; its raw table."""
    folder = tmp_path_factory.mktemp("photos")
    X, y = toy_table(n_per_class=6)
    ids = [f"p{i}" for i in range(len(X))]
    for product in ids:
        write_image(folder / f"{product}.png")
    raw = pd.DataFrame({"id": ids, "text": X["text"].to_numpy(dtype=object), "photo": [f"{i}.png" for i in ids],
                        "label": y})
    spec = TableSpec(text_columns=["text"], target="label", id_column="id", image_column="photo",
                     image_dir=str(folder))
    frame = raw.assign(image_path=[str(folder / p) for p in raw["photo"]])
    stack = StackingCategorizer([("text", NaiveBayesText()), ("image", ImageReadingText())], meta="average",
                                n_splits=2, progress=False).fit(frame, y)
    return Predictor.from_stack(stack, spec, precision=0.5), raw, folder


def test_every_image_missing_is_refused_unless_allowed(image_run, tmp_path):
    predictor, raw, _ = image_run
    with pytest.raises(DataError, match=r"none of the 24 rows has a usable image \(24 missing; e\.g\. .*p0\.png\)"
                                        r" in the image column 'photo'.*--allow-missing-images"):
        predictor.categorize(raw, image_dir=str(tmp_path / "no-such-folder"))
    allowed = predictor.categorize(raw, image_dir=str(tmp_path / "no-such-folder"), allow_missing_images=True)
    assert (allowed["review"] == "review").all()


def test_rows_without_a_usable_image_go_to_review_and_are_counted(image_run):
    predictor, raw, folder = image_run
    damaged = raw.assign(photo=[p if i % 3 else "gone.png" for i, p in enumerate(raw["photo"])])
    prepared = predictor.prepare(damaged)
    images = predictor.check_images(prepared)
    assert images.counts() == {"ok": 16, "missing": 8}
    assert images.problems()["id"].tolist() == [f"p{i}" for i in range(0, 24, 3)]
    assert "16 ok, 8 missing" in images.describe() and "go to review" in images.describe()
    predictions = predictor.predict_prepared(prepared.frame, images=images)
    whole = predictor.categorize(raw)
    assert (predictions["review"].to_numpy()[::3] == "review").all()
    # the rows whose photo is there keep the mark the photo-complete table gets
    kept = np.arange(24) % 3 != 0
    assert predictions["review"][kept].tolist() == whole["review"][kept].tolist()
    assert (whole["review"] == "auto").any()
    # without images=..., predict_prepared reads the statuses itself: the same marks
    assert predictor.predict_prepared(prepared.frame)["review"].tolist() == predictions["review"].tolist()


def test_a_table_without_the_photo_column_is_predicted_with_one_warning(image_run):
    predictor, raw, _ = image_run
    predictor = predictor.with_precision(0.5)
    with pytest.warns(UserWarning, match=r"no image column 'photo', which image read: the rows are predicted "
                                         r"without images and go to review") as caught:
        first = predictor.categorize(raw.drop(columns="photo"))
        second = predictor.categorize(raw.drop(columns="photo"))
    assert len([w for w in caught if "no image column" in str(w.message)]) == 1
    assert len(first) == len(raw) and (first["review"] == "review").all()
    assert first["id"].tolist() == raw["id"].tolist() == second["id"].tolist()


def test_image_dir_serves_a_table_without_the_photo_column_by_id(image_run):
    predictor, raw, folder = image_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = predictor.prepare(raw.drop(columns="photo"), image_dir=str(folder))
    assert prepared.frame["image_path"].tolist() == [str(folder / f"{i}.jpg") for i in raw["id"]]
    # the photos are PNGs: <id>.jpg, with the suffix of fit, is missing for every row, and said so
    with pytest.raises(DataError, match=r"image folder .* \(<id>\.jpg\)"):
        predictor.check_images(prepared)


def test_a_run_without_image_members_ignores_a_missing_photo_column(image_run):
    predictor, raw, _ = image_run
    text_only = StackingCategorizer([("text", NaiveBayesText())], meta="average", n_splits=2, progress=False)
    X, y = toy_table(n_per_class=6)
    text_only.fit(X.assign(image_path=None), y)
    plain = Predictor.from_stack(text_only, predictor.spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictions = plain.categorize(raw.drop(columns="photo"))
    assert plain.image_members == () and len(predictions) == len(raw)


@pytest.mark.slow
@pytest.mark.usefixtures("toy_model_in_the_cli")
def test_predict_cli_with_a_wrong_image_dir_fails_and_allowed_writes_the_problems_file(tmp_path, capsys):
    from stackcat import presets

    X, y = toy_table(n_per_class=6)
    photos = tmp_path / "photos"
    for i in X["id"]:
        write_image(photos / f"{i}.jpg")
    table = tmp_path / "train.csv"
    X.assign(label=y).to_csv(table, index=False)
    presets.register_model("toy_image", lambda options: ImageReadingText())
    try:
        run_dir = tmp_path / "run"
        code, _, err = run_cli(["fit", table, "--run-dir", run_dir, "--target", "label", "--text-columns", "text",
                                "--id-column", "id", "--image-dir", photos, "--models", "toy,toy_image",
                                "--folds", "2", "--meta", "average", "--no-progress"], capsys)
        assert code == EXIT_OK, err
        out = tmp_path / "predictions.csv"
        out.write_text("earlier predictions\n")
        code, _, err = run_cli(["predict", run_dir, table, "--out", out, "--image-dir", "nowhere"], capsys)
        assert code == EXIT_RUN_ERROR
        assert "none of the 24 rows has a usable image (24 missing" in err and "nowhere" in err
        assert out.read_text() == "earlier predictions\n"
        code, _, err = run_cli(["predict", run_dir, table, "--out", out, "--image-dir", "nowhere",
                                "--allow-missing-images"], capsys)
        assert code == EXIT_OK
        assert "images of 24 rows: 24 missing" in err
        assert (pd.read_csv(out)["review"] == "review").all()
        problems = pd.read_csv(image_problems_path(out))
        assert problems["status"].tolist() == ["missing"] * 24 and problems["id"].tolist() == X["id"].tolist()
        code, _, err = run_cli(["predict", run_dir, table, "--out", out, "--image-dir", photos], capsys)
        assert code == EXIT_OK and "images of 24 rows: 24 ok" in err
        assert pd.read_csv(image_problems_path(out)).empty
    finally:
        presets.unregister_model("toy_image")


# --------------------------------------------------------------------------- a cluster address that is not a scheduler


@pytest.fixture
def http_server():
    """A plain HTTP server on 127.0.0.1 (a dashboard's port, say): its tcp:// address."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_server_that_is_not_a_dask_scheduler_is_named_within_the_timeout(http_server):
    from stackcat.preflight import check_scheduler

    with pytest.raises(ConnectionError, match=rf"--scheduler {http_server}: no dask scheduler answered within 1 s"):
        check_scheduler(http_server, timeout=1)
    with pytest.raises(ConnectionError, match=r"--scheduler http://127\.0\.0\.1:1: cannot reach a dask scheduler "
                                              r"there \(ValueError: unknown address scheme 'http'"):
        check_scheduler("http://127.0.0.1:1", timeout=1)


@pytest.mark.slow
@pytest.mark.usefixtures("toy_model_in_the_cli")
def test_fit_with_a_scheduler_address_that_is_an_http_server_fails_naming_it(http_server, tmp_path, capsys,
                                                                            monkeypatch):
    import time

    from stackcat import preflight

    from toy_models import write_toy_csv

    monkeypatch.setattr(preflight, "SCHEDULER_TIMEOUT_S", 2.0)
    table = write_toy_csv(tmp_path / "train.csv")
    started = time.monotonic()
    code, _, err = run_cli(["fit", table, "--run-dir", tmp_path / "run", "--target", "label", "--text-columns",
                            "text", "--models", "toy", "--folds", "2", "--no-progress", "--scheduler", http_server],
                           capsys)
    assert code == EXIT_RUN_ERROR
    assert f"--scheduler {http_server}: no dask scheduler answered within 2 s" in err
    assert time.monotonic() - started < 60  # was: no output, forever
    assert not (tmp_path / "run" / "jobs").exists()


# --------------------------------------------------------------------------- checked before the first job


@pytest.fixture
def fits(tmp_path):
    """A folder where every fit of the toy model leaves a file: empty means no job ran."""
    folder = tmp_path / "fits"
    folder.mkdir()
    return folder


def fit_stack(tmp_path, fits, X=None, y=None, **params):
    if X is None:
        X, y = toy_table(n_per_class=6)
    models = params.pop("models", None) or [("nb", NaiveBayesText(calls_dir=str(fits)))]
    stack = StackingCategorizer(models, meta="average", n_splits=2, progress=False, run_dir=tmp_path / "run",
                                **params)
    return stack.fit(X, y)


def test_a_param_naming_a_missing_column_is_refused_before_any_job(tmp_path, fits):
    from stackcat.preflight import PreflightError

    models = [("nb", NaiveBayesText(calls_dir=str(fits))), ("titles", NaiveBayesText(text_column="name"))]
    with pytest.raises(PreflightError, match=r"estimator 'titles': text_column='name' names no column of the input "
                                             r"\(it has \['id', 'text'\]\)"):
        fit_stack(tmp_path, fits, models=models)
    assert not any(fits.iterdir()) and not (tmp_path / "run").exists()


TREE_FILES = {
    "a cycle": ("id,parent_id,title\nclass 0,class 1,a\nclass 1,class 0,b\nclass 2,,c\nclass 3,,d\n",
                r"the tree has a cycle through category 'class 0'"),
    "an empty file": ("", r"cannot read it as a table \(EmptyDataError"),
    "a header only": ("id,parent_id,title\n", r"has no rows"),
    "no parent column": ("id,title\nclass 0,a\n", r"the tree has no column 'parent_id'; it has \['id', 'title'\]"),
    "a label not in it": ("id,parent_id,title\nclass 0,,a\n", r"category 'class 1' is not a node of the tree"),
}


@pytest.mark.parametrize("case", TREE_FILES)
def test_a_tree_file_that_cannot_work_is_named_before_any_job(tmp_path, fits, case):
    from stackcat.taxonomy import TreeError

    text, message = TREE_FILES[case]
    tree = tmp_path / "tree.csv"
    tree.write_text(text)
    with pytest.raises(TreeError, match=rf"tree file {tree}: .*{message}|tree file {tree} {message}"):
        fit_stack(tmp_path, fits, tree=tree)
    assert not any(fits.iterdir())


def test_a_self_parent_ends_the_path_like_an_empty_parent(tmp_path, fits):
    tree = tmp_path / "tree.csv"
    tree.write_text("id,parent_id,title\ntop,top,All\n" + "".join(f"class {c},top,c{c}\n" for c in range(4)))
    assert fit_stack(tmp_path, fits, tree=tree).tree_.names == ["c0", "c1", "c2", "c3"]


@pytest.mark.parametrize(("labels", "separator", "message"), [
    (["a > x", "a > y"], "", r"the label separator is empty"),
    (["shirts", "jeans"], " > ", r"the label separator ' > ' occurs in none of the 2 categories"),
    (["Apparel > Topwear > Shirts", "Shirts"], " > ",
     r"category 'Shirts' is the end of the path 'Apparel > Topwear > Shirts': one category under two names"),
    (["A > Topwear > Shirts", "Topwear > Shirts", "A > Jeans"], " > ", r"'Topwear > Shirts' is the end of the path"),
    (["A > x", "A >x", "A > y"], " > ", r"spelled apart only by spaces around '>'"),
])
def test_path_labels_that_cannot_mean_a_tree_are_refused_before_any_job(tmp_path, fits, labels, separator,
                                                                        message):
    from stackcat.taxonomy import TreeError

    X, _ = toy_table(n_per_class=6)
    y = np.resize(np.asarray(labels, dtype=object), len(X))
    with pytest.raises(TreeError, match=message):
        fit_stack(tmp_path, fits, X=X, y=y, label_separator=separator)
    assert not any(fits.iterdir())


def test_paths_of_different_depths_in_different_branches_are_kept(tmp_path, fits):
    X, _ = toy_table(n_per_class=6)
    labels = ["Baby > Towels", "Home > Bath > Towels", "Home > Curtains", "Shirts"]
    stack = fit_stack(tmp_path, fits, X=X, y=np.resize(np.asarray(labels, dtype=object), len(X)),
                      label_separator=" > ")
    assert sorted(stack.tree_.names) == sorted(labels)


def test_a_signing_key_that_cannot_be_created_is_named_before_any_job(tmp_path, fits, monkeypatch):
    from stackcat.runs import RunFolderError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the key's folder should be")
    monkeypatch.setenv("STACKCAT_KEY_FILE", str(blocker / "key"))
    with pytest.raises(RunFolderError, match=rf"cannot create the signing key {blocker / 'key'} .*set "
                                             r"STACKCAT_KEY_FILE to a file path you can write"):
        fit_stack(tmp_path, fits)
    assert not any(fits.iterdir())


# --------------------------------------------------------------------------- wrong meaning, no warning


@pytest.mark.parametrize(("role", "described"), [
    ({"text_columns": ["text", "label"]}, "the text columns"),
    ({"text_columns": ["text"], "attribute_columns": ["label"]}, "the attribute columns"),
    ({"text_columns": ["text"], "id_column": "label"}, "the id column"),
])
def test_the_target_among_the_input_columns_is_refused(role, described):
    from stackcat.data import prepare_table

    X, y = toy_table(n_per_class=3)
    with pytest.raises(DataError, match=rf"the target column 'label' is also one of {described}.*read the answer"):
        prepare_table(X.assign(label=y), TableSpec(target="label", **role))


def test_numeric_labels_1_and_1_0_are_one_class_beside_a_fraction():
    from stackcat.data import prepare_table

    raw = pd.DataFrame({"text": ["a b", "c d", "e f", "g h"], "y": ["1", "1.0", "1.5", "2.00"]}, dtype=object)
    with pytest.warns(UserWarning, match=r"'1' \+ '1\.0' -> '1'"):
        prepared = prepare_table(raw, TableSpec(text_columns=["text"], target="y"))
    assert prepared.frame["label"].tolist() == ["1", "1", "1.5", "2"]


def test_an_id_column_with_an_empty_and_a_repeated_cell_is_still_the_id():
    from stackcat.columns import infer_spec

    n = 200
    rng = np.random.default_rng(0)
    words = np.array(["red", "blue", "cotton", "linen", "shirt", "jeans", "slim", "classic", "summer"])
    raw = pd.DataFrame({
        "sku": [f"SKU-{i}" for i in range(n)],
        "name": [" ".join(rng.choice(words, 4)) for _ in range(n)],
        "type": rng.choice(["shirt", "jeans"], n),
    }, dtype=object)
    raw.loc[3, "sku"] = ""
    raw.loc[7, "sku"] = "SKU-6"
    spec = infer_spec(raw, target="type").spec
    assert spec.id_column == "sku" and "sku" not in spec.text_columns
    numbered = raw.assign(sku=None, product_id=[str(i) for i in range(n)]).drop(columns="sku")
    numbered.loc[5, "product_id"] = ""
    assert infer_spec(numbered, target="type").spec.id_column == "product_id"


def test_a_number_column_unique_but_for_a_few_cells_is_not_an_id_without_an_id_name():
    from stackcat.columns import infer_spec

    n = 200
    raw = pd.DataFrame({"name": [f"red cotton shirt {i % 7}" for i in range(n)], "price": [str(100 + i) for i in range(n)],
                        "type": ["shirt", "jeans"] * (n // 2)}, dtype=object)
    raw.loc[3, "price"] = "101"
    assert infer_spec(raw, target="type").spec.id_column is None


def test_top_5_accuracy_is_not_known_with_fewer_than_5_probabilities_kept(tmp_path, fits):
    from stackcat.metrics import score
    from stackcat.topk import top_k_rows

    proba = np.array([[0.4, 0.3, 0.2, 0.06, 0.04, 0.0]] * 2)
    truth = np.array([4, 5])
    assert score(truth, proba)["top5_accuracy"] == 0.5
    assert np.isnan(score(truth, top_k_rows(proba, 2))["top5_accuracy"])
    assert score(truth, top_k_rows(proba, 5))["top5_accuracy"] == 0.5
    X, y = toy_table(n_per_class=6, n_classes=7)
    stack = fit_stack(tmp_path, fits, X=X, y=y, oof_top_k=2)
    assert stack.oof_scores_["top5_accuracy"].isna().all()


@pytest.mark.usefixtures("toy_model_in_the_cli")
def test_sigterm_stops_a_fit_as_ctrl_c_does(tmp_path, capsys, monkeypatch):
    import os
    import signal

    from toy_models import write_toy_csv

    fit, calls = NaiveBayesText.fit, []

    def terminated_on_third_fit(self, X, y):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return fit(self, X, y)

    monkeypatch.setattr(NaiveBayesText, "fit", terminated_on_third_fit)
    table = write_toy_csv(tmp_path / "train.csv")
    run_dir = tmp_path / "run"
    code, _, err = run_cli(["fit", table, "--run-dir", run_dir, "--target", "label", "--text-columns", "text",
                            "--models", "toy", "--folds", "5", "--meta", "average", "--no-progress"], capsys)
    assert code == EXIT_RUN_ERROR
    assert f"stopped by SIGTERM; finished jobs are saved in {run_dir}" in err and "--resume" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_onnxruntime_telemetry_is_switched_off_before_a_session(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from stackcat.features import onnx_backend

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph), path)
    switched_off = []
    monkeypatch.setattr(ort, "disable_telemetry_events", lambda: switched_off.append(True))
    onnx_backend.inference_session(path, threads=1)
    onnx_backend.clear_sessions()
    assert switched_off


def test_a_column_an_estimator_reads_only_when_present_is_not_required():
    from stackcat.models.fasttext import FastTextClassifier
    from stackcat.preflight import missing_columns_of

    X = pd.DataFrame({"text": ["a red shirt", "blue jeans"]})
    assert missing_columns_of([("fasttext", FastTextClassifier())], X) == []  # title_column="title" is optional
    assert missing_columns_of([("fasttext", FastTextClassifier(text_column="body"))], X) != []
