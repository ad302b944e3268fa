"""Tests of the embedded demo data set ``stackcat/demo/``."""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import stackcat.demo as demo
from stackcat.demo import DEMO_COLUMNS, demo_csv_path, load_demo

DEMO_DIR = Path(demo.__file__).resolve().parent
CSV_COLUMNS = [
    "id",
    "productDisplayName",
    "gender",
    "baseColour",
    "season",
    "year",
    "usage",
    "articleType",
]
LEAK_COLUMNS = {"masterCategory", "subCategory"}
TEXT_COLUMNS = [
    "productDisplayName",
    "gender",
    "baseColour",
    "season",
    "usage",
    "articleType",
    "image_path",
]


@pytest.fixture(scope="module")
def full():
    return load_demo()


def test_csv_is_packaged_next_to_the_module():
    path = demo_csv_path()
    assert path.is_absolute()
    assert path == DEMO_DIR / "products.csv"
    assert path.is_file()


def test_rows_and_columns(full):
    frame, image_dir = full
    assert 2000 <= len(frame) <= 2500
    assert list(frame.columns) == CSV_COLUMNS + ["image_path"]
    assert frame["id"].is_unique
    assert frame.index.equals(pd.RangeIndex(len(frame)))
    raw = pd.read_csv(demo_csv_path())
    assert list(raw.columns) == CSV_COLUMNS
    assert len(raw) == len(frame)
    assert image_dir == DEMO_DIR / "images"
    assert frame["articleType"].notna().all()


def test_text_columns_are_plain_object(full):
    frame, _ = full
    for column in TEXT_COLUMNS:
        assert frame[column].dtype == object, column
    assert pd.api.types.is_integer_dtype(frame["id"])
    # Missing values stay missing (real data), as NaN, not the string "nan".
    missing = frame.loc[frame["usage"].isna(), "usage"]
    assert len(missing) >= 1
    assert all(isinstance(v, float) and np.isnan(v) for v in missing)
    # scikit-learn style positional indexing on the text column works.
    picked = frame["productDisplayName"].to_numpy()[np.array([0, 2])]
    assert picked.dtype == object and isinstance(picked[0], str)


def test_demo_columns_describe_the_frame(full):
    frame, _ = full
    assert DEMO_COLUMNS["target"] == "articleType"
    assert DEMO_COLUMNS["id_column"] == "id"
    assert DEMO_COLUMNS["image_column"] == "image_path"
    assert DEMO_COLUMNS["text_columns"] == ["productDisplayName"]
    assert DEMO_COLUMNS["attribute_columns"] == ["gender", "baseColour", "season", "usage"]
    named = [
        *DEMO_COLUMNS["text_columns"],
        *DEMO_COLUMNS["attribute_columns"],
        DEMO_COLUMNS["target"],
        DEMO_COLUMNS["id_column"],
        DEMO_COLUMNS["image_column"],
    ]
    assert set(named) <= set(frame.columns)
    assert "year" not in DEMO_COLUMNS["attribute_columns"]


def test_no_leak_columns(full):
    frame, _ = full
    assert not LEAK_COLUMNS & set(frame.columns)
    header = demo_csv_path().read_text(encoding="utf-8").splitlines()[0]
    assert not any(leak in header for leak in LEAK_COLUMNS)


def test_every_image_exists_and_is_rgb_jpeg(full):
    frame, image_dir = full
    for product_id, path in zip(frame["id"], frame["image_path"], strict=True):
        path = Path(path)
        assert path.is_absolute()
        assert path == image_dir / f"{product_id}.jpg"
        with Image.open(path) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            im.load()
            assert max(im.size) <= 128
    # No orphan image in the folder.
    on_disk = {p.name for p in image_dir.glob("*.jpg")}
    assert on_disk == {f"{i}.jpg" for i in frame["id"]}


def test_long_tail_is_kept(full):
    frame, _ = full
    counts = frame["articleType"].value_counts()
    assert (counts < 5).sum() >= 1
    assert counts.min() == 1
    assert counts.size >= 50


def test_folder_size_at_most_10_mb():
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total <= 10 * 1024 * 1024, total


def test_readme_matches_the_data(full):
    frame, _ = full
    text = (DEMO_DIR / "README.md").read_text(encoding="utf-8")
    assert f"{len(frame):,} rows" in text
    assert f"{frame['articleType'].nunique()} classes" in text
    assert "MIT" in text and "91e8036" in text and "7cf2634" in text
    assert "experiments/build_demo_data.py" in text


def test_library_does_not_reference_shared_data():
    for path in DEMO_DIR.rglob("*.py"):
        assert "shared" not in path.read_text(encoding="utf-8"), path


@pytest.mark.parametrize("n_rows", [300, 1000])
def test_subsample_is_stratified(full, n_rows):
    frame, _ = full
    sub, image_dir = load_demo(n_rows=n_rows, random_state=0)
    assert len(sub) == n_rows
    assert sub["id"].is_unique
    assert list(sub.columns) == list(frame.columns)
    assert sub.index.equals(pd.RangeIndex(n_rows))
    assert sub["id"].is_monotonic_increasing  # the table's order is kept
    counts = frame["articleType"].value_counts()
    sub_counts = sub["articleType"].value_counts().reindex(counts.index, fill_value=0)
    # Every class, long tail included, keeps at least one row.
    assert (sub_counts >= 1).all()
    expected = counts * n_rows / counts.sum()
    assert ((sub_counts - expected).abs() < 1.5).all()
    # Rows are real rows of the full table, unchanged.
    merged = sub.merge(frame, on="id", suffixes=("", "_full"))
    assert len(merged) == n_rows
    for column in ["productDisplayName", "articleType", "image_path"]:
        assert merged[column].equals(merged[f"{column}_full"])
    for column in TEXT_COLUMNS:
        assert sub[column].dtype == object


def test_subsample_is_deterministic():
    a, _ = load_demo(n_rows=200, random_state=7)
    b, _ = load_demo(n_rows=200, random_state=7)
    c, _ = load_demo(n_rows=200, random_state=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["id"].equals(c["id"])


def test_subsample_smaller_than_number_of_classes():
    sub, _ = load_demo(n_rows=10, random_state=0)
    assert len(sub) == 10
    assert sub["id"].is_unique


def test_full_size_subsample_is_the_whole_table(full):
    frame, _ = full
    sub, _ = load_demo(n_rows=len(frame), random_state=3)
    pd.testing.assert_frame_equal(sub, frame)


@pytest.mark.parametrize("bad", [0, -1, 10**6, 2.5, "100", True])
def test_bad_n_rows(bad):
    with pytest.raises(ValueError, match="n_rows"):
        load_demo(n_rows=bad)


def test_docstring_example_runs():
    result = doctest.testmod(demo, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
