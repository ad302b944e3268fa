"""Column roles inferred for a one-call fit (stackcat.columns).

``tests/data/myntra_sample.csv``: 200 rows drawn at random (seed 0) from the
Myntra table in /work/shared/data/myntra (see its README for provenance).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stackcat.cli import EXIT_OK, EXIT_RUN_ERROR, _names, main
from stackcat.columns import infer_spec, spec_flags
from stackcat.data import DataError, TableSpec, prepare_table, read_table

from tiny_images import write_image

DATA_DIR = Path(__file__).parent / "data"
MYNTRA = DATA_DIR / "myntra_sample.csv"
MYNTRA_ATTRIBUTES = ["gender", "masterCategory", "subCategory", "baseColour", "season", "year", "usage"]
FAST = ["--models", "toy", "--folds", "3", "--meta", "average", "--no-progress"]


@pytest.fixture(scope="module")
def myntra() -> pd.DataFrame:
    return read_table(MYNTRA)


def test_myntra_columns_get_their_roles(myntra):
    found = infer_spec(myntra, target="articleType", base_dir=DATA_DIR)
    spec = found.spec
    assert found.inferred
    assert spec.target == "articleType" and spec.id_column == "id"
    assert list(spec.text_columns) == ["productDisplayName"]
    assert list(spec.attribute_columns) == MYNTRA_ATTRIBUTES
    assert spec.image_column is None
    described = found.describe()
    assert "productDisplayName  title: free text" in described and "id                  id: unique" in described


@pytest.mark.parametrize("target", ["articleType", "masterCategory", "gender"])
def test_the_target_is_never_a_feature(myntra, target):
    spec = infer_spec(myntra, target=target).spec
    features = [*spec.text_columns, *spec.attribute_columns, spec.id_column, spec.image_column]
    assert target not in features
    assert "articleType" in features or target == "articleType"


def test_the_kazanexpress_fixture_keeps_its_own_format(ke_csv):
    raw = read_table(ke_csv)
    found = infer_spec(raw, base_dir=ke_csv.parent)
    assert not found.inferred and found.describe() == ""
    assert found.spec == TableSpec.detect(raw.columns)
    assert (found.spec.json_column, found.spec.id_column, found.spec.target) == ("text_fields", "product_id",
                                                                                 "category_id")


def test_a_kazanexpress_table_flattened_is_inferred(ke_csv):
    raw = read_table(ke_csv)
    fields = [_fields(value) for value in raw["text_fields"]]
    flat = raw.drop(columns="text_fields").assign(
        title=[f.get("title") for f in fields], description=[f.get("description") for f in fields])
    spec = infer_spec(flat, target="category_id").spec
    assert spec.id_column == "product_id"
    assert list(spec.text_columns)[0] == "title" and "description" in spec.text_columns
    assert "category_id" not in [*spec.text_columns, *spec.attribute_columns]
    assert "shop_title" in spec.attribute_columns and "sale" in spec.attribute_columns


def _fields(value) -> dict:
    try:
        return json.loads(value)
    except (TypeError, ValueError):  # the fixture's malformed and empty rows
        return {}


def test_name_like_columns_come_first_and_descriptions_last():
    n = 12
    raw = pd.DataFrame({
        "details": [f"long text number {i} about cotton and fit" for i in range(n)],
        "notes": [f"free words here {i} too" for i in range(n)],
        "product_name": [f"Shirt model {i}" for i in range(n)],
        "kind": ["a", "b"] * (n // 2),
    })
    assert list(infer_spec(raw, target="kind").spec.text_columns) == ["product_name", "notes", "details"]


def test_numbers_empty_and_constant_columns(myntra):
    rng = np.random.default_rng(0)
    raw = myntra.assign(price=rng.integers(100, 10_000, len(myntra)).astype(str), empty=None, shop="Myntra")
    found = infer_spec(raw, target="articleType")
    assert {"price", "empty", "shop"}.isdisjoint([*found.spec.text_columns, *found.spec.attribute_columns])
    assert found.reasons["price"].startswith("not used: a number with")
    assert found.reasons["empty"] == "not used: empty"
    assert found.reasons["shop"].startswith("not used: the same value in every row")


def test_image_files_relative_to_the_table_are_an_image_column(myntra, tmp_path):
    sample = myntra.head(30).copy()
    for product_id in sample["id"][:5]:
        write_image(tmp_path / "pics" / f"{product_id}.png")
    sample["picture"] = [f"pics/{i}.png" for i in sample["id"]]
    sample["thumbnail"] = [f"thumbs/{i}.jpg" for i in sample["id"]]  # no such files
    found = infer_spec(sample, target="articleType", base_dir=tmp_path)
    assert found.spec.image_column == "picture"
    assert found.reasons["picture"].startswith("image: 5 of the first 20 files found")
    assert found.reasons["thumbnail"].startswith("not used: image file names, but none of the first 20")
    prepared = prepare_table(sample, found.spec, base_dir=tmp_path)
    assert prepared.frame["image_path"].iloc[0] == str(tmp_path / "pics" / f"{sample['id'].iloc[0]}.png")


def test_flags_override_their_roles(myntra):
    found = infer_spec(myntra, target="articleType", attribute_columns=["gender"], id_column="productDisplayName")
    spec = found.spec
    assert list(spec.attribute_columns) == ["gender"] and spec.id_column == "productDisplayName"
    assert "productDisplayName" not in spec.text_columns and spec.text_columns == ()
    assert found.reasons["gender"] == "attribute (named)"
    assert found.reasons["id"].startswith("not used: unique values like the id (productDisplayName)")
    named = infer_spec(myntra, target="articleType", text_columns=["productDisplayName"])
    assert not named.inferred and named.spec.attribute_columns == () and named.spec.id_column is None


def test_the_printed_flags_give_the_same_spec(myntra):
    found = infer_spec(myntra, target="articleType")
    flags = shlex.split(found.describe().splitlines()[-1].removeprefix("  same as: "))
    assert flags == spec_flags(found.spec)
    pairs = dict(zip(flags[::2], flags[1::2]))
    again = infer_spec(myntra, target=pairs["--target"], text_columns=_names(pairs["--text-columns"]),
                       attribute_columns=_names(pairs["--attribute-columns"]), id_column=pairs["--id-column"])
    assert again.spec == found.spec


def test_without_a_target_the_message_says_how_to_name_it(myntra):
    with pytest.raises(DataError, match=r"no target column named.*\(--target\).*--text-columns"):
        infer_spec(myntra)
    with pytest.raises(DataError, match=r"missing column\(s\) 'article_type'"):
        infer_spec(myntra, target="article_type")


def test_one_call_fit_prints_stores_and_predicts_with_the_inferred_spec(tmp_path, capsys, toy_model_in_the_cli):
    run_dir = tmp_path / "run"
    assert main(["fit", str(MYNTRA), "--target", "articleType", "--run-dir", str(run_dir), *FAST]) == EXIT_OK
    out = capsys.readouterr().out
    assert "columns (inferred" in out and "productDisplayName  title: free text" in out
    stored = json.loads((run_dir / "table.json").read_text())["spec"]
    assert stored["text_columns"] == ["productDisplayName"] and stored["attribute_columns"] == MYNTRA_ATTRIBUTES
    assert stored["id_column"] == "id" and stored["target"] == "articleType"
    predictions = tmp_path / "predictions.csv"
    assert main(["predict", str(run_dir), str(MYNTRA), "--out", str(predictions)]) == EXIT_OK
    written = pd.read_csv(predictions, dtype=str)
    assert written["id"].tolist() == read_table(MYNTRA)["id"].tolist()


def test_one_call_fit_flag_overrides_the_inferred_role(tmp_path, capsys, toy_model_in_the_cli):
    run_dir = tmp_path / "run"
    code = main(["fit", str(MYNTRA), "--target", "articleType", "--attribute-columns", "gender,usage",
                 "--run-dir", str(run_dir), *FAST])
    assert code == EXIT_OK
    stored = json.loads((run_dir / "table.json").read_text())["spec"]
    assert stored["attribute_columns"] == ["gender", "usage"] and stored["text_columns"] == ["productDisplayName"]
    assert main(["fit", str(MYNTRA), "--run-dir", str(tmp_path / "r2"), *FAST]) == EXIT_RUN_ERROR
    assert "--target" in capsys.readouterr().err
