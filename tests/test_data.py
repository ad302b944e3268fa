from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stackcat.data import (
    SALE_WORD,
    DataError,
    TableSpec,
    ke_product_text,
    prepare_table,
    read_table,
    upweight_title,
)

MALFORMED_ID, NO_TARGET_ID, EMPTY_TEXT_ID = 100006, 100015, 100024


@pytest.fixture
def ke_frame(ke_csv):
    return read_table(ke_csv)


@pytest.fixture
def ke_prepared(ke_frame):
    return prepare_table(ke_frame, TableSpec.detect(ke_frame.columns))


def row_of(prepared, product_id):
    return prepared.frame.loc[prepared.frame["id"] == str(product_id)].iloc[0]


def test_kazanexpress_format_is_detected(ke_frame):
    spec = TableSpec.detect(ke_frame.columns)
    assert spec.json_column == "text_fields"
    assert (spec.target, spec.id_column, spec.shop_column, spec.sale_column) == (
        "category_id", "product_id", "shop_title", "sale")


def test_recipe_shop_and_title_first(ke_prepared):
    row = row_of(ke_prepared, 100001)
    assert row["title"] == "Зарядный кабель Borofone BX1 Lightning для айфон, 1м"
    assert row["text"].startswith("Aksik: Зарядный кабель Borofone BX1 Lightning для айфон, 1м. ")
    assert "Длина: 1м, 2м, Разъем: Lightning, Type-C" in row["text"]  # nested characteristics


def test_recipe_strips_html_brackets_and_entities(ke_prepared):
    texts = " ".join(ke_prepared.frame["text"])
    for fragment in ("<p>", "</li>", "<br>", "[", "]", "{", "}", "&amp;", '"'):
        assert fragment not in texts
    assert "Гарантия 12 мес" in texts and "качество & быстрая" in texts


def test_recipe_drops_rating_and_marks_sale(ke_frame, ke_prepared):
    for _, raw in ke_frame.iterrows():
        if int(raw["product_id"]) in (MALFORMED_ID, NO_TARGET_ID, EMPTY_TEXT_ID):
            continue
        text = row_of(ke_prepared, raw["product_id"])["text"]
        assert str(json.loads(raw["text_fields"])["rating"]) not in text
        assert text.endswith(SALE_WORD) == (raw["sale"] == "True")


def test_bad_rows_are_reported_with_their_ids(ke_prepared):
    reasons = {e.row_id: (e.column, e.reason) for e in ke_prepared.errors}
    assert reasons[str(MALFORMED_ID)][0] == "text_fields"
    assert reasons[str(MALFORMED_ID)][1].startswith("malformed JSON")
    assert reasons[str(NO_TARGET_ID)] == ("category_id", "missing target")
    assert reasons[str(EMPTY_TEXT_ID)][1] == "empty product text"
    assert len(ke_prepared.frame) == 33 and ke_prepared.n_input_rows == 36
    assert not ke_prepared.frame["id"].isin([str(i) for i in reasons]).any()
    summary = ke_prepared.summary()
    assert "36 rows read, 33 kept, 3 row problem(s), 4 categories" in summary
    assert f"id '{MALFORMED_ID}'" in summary


def test_strict_mode_lists_every_bad_row(ke_frame):
    with pytest.raises(DataError) as info:
        prepare_table(ke_frame, TableSpec.detect(ke_frame.columns), strict=True)
    message = str(info.value)
    assert "3 bad row(s)" in message
    for product_id in (MALFORMED_ID, NO_TARGET_ID, EMPTY_TEXT_ID):
        assert str(product_id) in message


def test_rows_to_predict_are_all_kept(ke_frame):
    spec = TableSpec.detect(ke_frame.drop(columns="category_id").columns)
    prepared = prepare_table(ke_frame.drop(columns="category_id"), spec, with_target=False)
    assert len(prepared.frame) == 36 and "label" not in prepared.frame
    fallback = row_of(prepared, MALFORMED_ID)["text"]
    assert "Borofone" not in fallback and fallback  # best-effort text from the broken JSON
    assert "title:" in fallback or "title" in fallback


def test_ke_text_fields_as_mapping_and_sale_column_wins():
    title, text = ke_product_text({"title": "Кружка", "sale": True}, shop_title=None, sale="False")
    assert (title, text) == ("Кружка", "Кружка")


def test_upweight_title_repeats_first_words():
    assert upweight_title("Shop: a b c d", "a b c d", words=3, repeat=2) == "a b c a b c Shop: a b c d"
    assert upweight_title("x y", None, words=1, repeat=1) == "x x y"
    assert upweight_title("x y", "t", words=3, repeat=0) == "x y"


def test_generic_spec_attributes_and_lowercase():
    raw = pd.DataFrame({"name": ["Red Shirt", "Jeans"], "colour": ["Red", ["Blue", "Navy"]],
                        "season": [None, "Fall"], "type": ["Shirts", "Jeans"], "sku": ["a1", "b2"]})
    spec = TableSpec(text_columns=["name"], attribute_columns=["colour", "season"], target="type",
                     id_column="sku", lowercase=True)
    frame = prepare_table(raw, spec).frame
    assert frame["text"].tolist() == ["red shirt. colour: red", "jeans. colour: blue, navy, season: fall"]
    assert frame["id"].tolist() == ["a1", "b2"] and frame["title"].tolist() == ["red shirt", "jeans"]


def test_attributes_without_keys():
    raw = pd.DataFrame({"name": ["Red Shirt"], "colour": ["Red"], "season": ["Fall"], "type": ["Shirts"]})
    spec = TableSpec(text_columns=["name"], attribute_columns=["colour", "season"], target="type",
                     attribute_keys=False)
    assert prepare_table(raw, spec).frame["text"].tolist() == ["Red Shirt. Red, Fall"]


def test_missing_columns_are_named_with_a_hint():
    raw = pd.DataFrame({"name": ["x"], "categroy": ["y"]})
    with pytest.raises(DataError, match=r"missing column\(s\) 'category' \(did you mean 'categroy'\?\)"):
        prepare_table(raw, TableSpec(text_columns=["name"], target="category"))


def test_generic_table_without_text_columns_is_refused():
    with pytest.raises(DataError, match="which columns hold the product text"):
        TableSpec.detect(["a", "b"])


def test_no_target_named_for_training():
    with pytest.raises(DataError, match="no target column"):
        prepare_table(pd.DataFrame({"a": ["x"]}), TableSpec(text_columns=["a"]))


def test_labels_of_mixed_types_become_text():
    raw = pd.DataFrame({"t": ["a", "b", "c"], "y": [1, "shoes", np.int64(2)]}, dtype=object)
    prepared = prepare_table(raw, TableSpec(text_columns=["t"], target="y"))
    assert prepared.frame["label"].tolist() == ["1", "shoes", "2"]


def test_integral_float_labels_are_written_as_integers():
    raw = pd.DataFrame({"t": ["a", "b", "c"], "y": [1.0, np.nan, 3.0]})
    prepared = prepare_table(raw, TableSpec(text_columns=["t"], target="y"))
    assert prepared.frame["label"].tolist() == ["1", "3"]
    assert [e.reason for e in prepared.errors] == ["missing target"]


def test_duplicate_ids_left_out_of_training():
    raw = pd.DataFrame({"t": ["a", "b", "c"], "y": ["p", "q", "r"], "id": ["1", "2", "1"]})
    prepared = prepare_table(raw, TableSpec(text_columns=["t"], target="y", id_column="id"))
    assert prepared.frame["t" if False else "text"].tolist() == ["a", "b"]
    assert "duplicate product id (first seen at row 0)" in prepared.errors[0].reason


def test_image_paths_from_dir_or_column(tmp_path):
    raw = pd.DataFrame({"t": ["a", "b"], "pid": ["7", "8"], "img": ["x/7.png", None]})
    by_dir = prepare_table(raw, TableSpec(text_columns=["t"], id_column="pid", image_dir="pics"),
                           with_target=False, base_dir=tmp_path).frame
    assert by_dir["image_path"].tolist() == [str(tmp_path / "pics/7.jpg"), str(tmp_path / "pics/8.jpg")]
    by_column = prepare_table(raw, TableSpec(text_columns=["t"], image_column="img"),
                              with_target=False, base_dir=tmp_path).frame
    assert by_column["image_path"].tolist() == [str(tmp_path / "x/7.png"), None]


# ---------------------------------------------------------------- reading files


def test_read_csv_keeps_ids_as_text_and_object_dtype(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,name,y\n007,Red shirt,1\n", encoding="utf-8")
    frame = read_table(path)
    assert frame["id"].tolist() == ["007"] and frame["name"].dtype == object


def test_read_parquet_round_trip_with_nested_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"name": ["Mug", "Cup"], "tags": [["white", "big"], []], "y": [1, 2]}).to_parquet(path)
    frame = read_table(path)
    prepared = prepare_table(frame, TableSpec(text_columns=["name"], attribute_columns=["tags"], target="y"))
    assert prepared.frame["text"].tolist() == ["Mug. tags: white, big", "Cup"]
    assert prepared.frame["label"].tolist() == ["1", "2"]


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"a,b\n", "header but no rows"),
])
def test_read_empty_files(tmp_path, content, message):
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_table(path)


def test_read_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown table type '.xlsx'"):
        read_table(tmp_path / "t.xlsx")
    (tmp_path / "t.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_table(tmp_path / "t.parquet")


def test_read_non_utf8_bytes_warns_with_line_numbers(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"name,y\nok,1\n" + b"caf\xe9,2\n")
    with pytest.warns(UserWarning, match=r"not UTF-8 on line\(s\) 3"):
        frame = read_table(path)
    assert frame["name"].tolist() == ["ok", "caf\ufffd"]


def test_read_table_checks_named_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"t.csv: missing column\(s\) 'c'"):
        read_table(path, columns=["a", "c"])
