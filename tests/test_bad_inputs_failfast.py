"""Issue 20 (fail in seconds, never degrade in silence) and issue 19 item 4 (predict without a photo column).

Each class of problem of docs/reliability.md rows 55 and up has its tests here:
a degraded prediction says so, a cluster address that is not a scheduler fails
fast, checks that depend only on the table, the flags and the environment run
before the first (model, fold) job, and input whose meaning is wrong is refused
or named.
"""

from __future__ import annotations

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
