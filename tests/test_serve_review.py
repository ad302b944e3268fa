"""The review loop: queues from files and from the service, decisions in SQLite, their export, the next fit."""

from __future__ import annotations

import json
import sqlite3

import pandas as pd
import pytest
from PIL import Image
from starlette.testclient import TestClient

from stackcat.corrections import apply_corrections, read_corrections
from stackcat.data import DataError, TableSpec
from stackcat.serve import create_app
from stackcat.serve.store import CorrectionStore

from serve_fixtures import toy_predictor


@pytest.fixture(scope="module")
def predictor():
    return toy_predictor()


@pytest.fixture
def products(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), (0, 120, 0)).save(images / "green.jpg")
    table = tmp_path / "products.csv"
    pd.DataFrame({"sku": ["a", "b", "c"], "name": ["w1 n2", "w2 n5", "w3"], "colour": ["red", "", "blue"],
                  "photo": ["images/green.jpg", "", ""]}).to_csv(table, index=False)
    return table


@pytest.fixture
def client(predictor, products, tmp_path):
    app = create_app(predictor, corrections=tmp_path / "c.sqlite", products=products, token="s3cret",
                     image_roots=[products.parent / "images"])
    with TestClient(app) as test_client:
        yield test_client


AUTH = {"Authorization": "Bearer s3cret"}
PREDICTIONS = ("sku,category,probability,review,top5_categories,top5_probabilities\n"
               'a,class 1,0.55,review,"[""class 1"", ""class 2""]","[0.55, 0.3]"\n'
               'b,class 2,0.9,auto,"[""class 2"", ""class 0""]","[0.9, 0.05]"\n')
LABEL_ISSUES = ("id,given_label,suggested_label,given_probability,suggested_probability,score\n"
                "c,class 0,class 3,0.05,0.9,0.05\n")


def test_a_predictions_file_becomes_a_queue_with_text_and_photos(client):
    items = client.post("/v1/queue", files={"file": ("p.csv", PREDICTIONS, "text/csv")}).json()["items"]
    assert [i["id"] for i in items] == ["a", "b"]
    first = items[0]
    assert first["proposed"] == "class 1" and [c["category"] for c in first["candidates"]] == ["class 1", "class 2"]
    assert first["candidates"][0]["path"] == "class 1" and first["title"] == "w1 n2" and first["has_image"]
    assert client.get("/v1/images/a").headers["content-type"] == "image/jpeg"
    assert client.get("/v1/images/b").status_code == 404


def test_a_label_issues_file_proposes_the_suggestion_and_shows_the_given_label(client):
    [item] = client.post("/v1/queue", content=LABEL_ISSUES).json()["items"]
    assert item["kind"] == "label_issue" and item["proposed"] == "class 3" and item["given_label"] == "class 0"
    assert [c["category"] for c in item["candidates"]] == ["class 3", "class 0"] and item["text"]


@pytest.mark.parametrize(("text", "field"), [
    ("id,foo\n1,2\n", "file"),
    ('id,category,top5_categories,top5_probabilities\n1,x,"[oops","[1]"\n', "row 2, top5_categories"),
])
def test_an_unusable_queue_file_is_a_422_naming_where(client, text, field):
    answer = client.post("/v1/queue", content=text)
    assert answer.status_code == 422 and answer.json()["field"] == field


def test_products_the_service_marks_for_review_are_queued(predictor, tmp_path):
    strict = predictor.with_precision(1.0)  # every prediction goes to review
    with TestClient(create_app(strict)) as client:
        client.post("/v1/categorize", json={"products": [{"sku": "z9", "name": "w0 n1"}]})
        items = client.get("/v1/queue/pending").json()["items"]
    assert [i["id"] for i in items] == ["z9"] and items[0]["kind"] == "pending" and items[0]["title"] == "w0 n1"


def test_decisions_need_the_token_are_committed_and_exported(client, tmp_path):
    decision = {"id": "a", "label": "class 2", "was": "class 1", "source": "p.csv"}
    assert client.post("/v1/corrections", json=decision).status_code == 401
    assert client.post("/v1/corrections", json=decision, headers={"Authorization": "Bearer wrong"}).status_code == 401
    saved = client.post("/v1/corrections", json=decision, headers=AUTH)
    assert saved.status_code == 201 and saved.json()["seq"] == 1
    client.post("/v1/corrections", json={**decision, "label": "class 3"}, headers=AUTH)
    # committed: another connection sees both rows at once
    rows = sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT id, label FROM corrections").fetchall()
    assert rows == [("a", "class 2"), ("a", "class 3")]
    assert client.get("/v1/corrections.csv").text.splitlines() == ["id,label", "a,class 3"]
    items = client.post("/v1/queue", content=PREDICTIONS).json()["items"]
    assert items[0]["decided"] == "class 3"


@pytest.mark.parametrize(("body", "field"), [
    ({"id": "a", "label": "no such class"}, "label"),
    ({"id": "", "label": "class 1"}, "id"),
    ({"id": "a"}, "label"),
    ({"id": "a", "label": "class 1", "who": "me"}, "who"),
    ({"id": "a", "label": "class 1", "was": 3}, "was"),
])
def test_bad_decisions_get_a_422_naming_the_field(client, body, field):
    answer = client.post("/v1/corrections", json=body, headers=AUTH)
    assert answer.status_code == 422 and answer.json()["field"] == field


def test_without_a_database_decisions_are_refused(predictor):
    with TestClient(create_app(predictor)) as client:
        answer = client.post("/v1/corrections", json={"id": "a", "label": "class 1"})
    assert answer.status_code == 409


def test_the_store_is_in_wal_mode_with_full_sync(tmp_path):
    store = CorrectionStore(tmp_path / "x.sqlite")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_the_page_and_its_files_are_served_without_any_outside_reference(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        text = client.get(f"/static/{name}").text
        assert "http://" not in text and "https://" not in text
    assert "http" not in page.text.replace('http-equiv', '')


# --------------------------------------------------------------------------- the next fit


def test_corrections_override_labels_and_report_unknown_ids(tmp_path):
    path = tmp_path / "corrections.csv"
    path.write_text("id,label\n1,Shoes\n2,Bags\n2,Belts\nzz,Caps\n3,Tops\n")
    corrections = read_corrections(path)
    assert corrections.values.tolist() == [["1", "Shoes"], ["2", "Belts"], ["zz", "Caps"], ["3", "Tops"]]
    raw = pd.DataFrame({"pid": [1, 2, 3], "title": ["x", "y", "z"], "cat": ["Tops", "Bags", "Tops"]})
    corrected, applied = apply_corrections(raw, TableSpec(text_columns=["title"], id_column="pid", target="cat"),
                                           corrections)
    assert corrected["cat"].tolist() == ["Shoes", "Belts", "Tops"] and raw["cat"].tolist() == ["Tops", "Bags", "Tops"]
    assert (applied.changed, applied.unchanged, applied.unknown_ids) == (2, 1, ["zz"])
    assert "'zz'" in applied.describe()


@pytest.mark.parametrize(("text", "message"), [("id,cat\n1,x\n", "missing ['label']"),
                                               ("id,label\n1,\n", "row 1 has an empty 'label'")])
def test_a_bad_corrections_file_is_refused_naming_what(tmp_path, text, message):
    path = tmp_path / "c.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_corrections(path)


@pytest.mark.slow
def test_fit_with_corrections_trains_on_the_corrected_labels(tmp_path, toy_model_in_the_cli, capsys):
    from stackcat.cli import EXIT_OK, main
    from stackcat.stacking import StackingCategorizer

    from toy_models import write_toy_csv

    train = write_toy_csv(tmp_path / "train.csv")
    table = pd.read_csv(train, dtype=str)
    fixes = tmp_path / "corrections.csv"
    pd.DataFrame({"id": [table["id"][0], "nope"], "label": ["class 9", "class 1"]}).to_csv(fixes, index=False)
    run_dir = tmp_path / "run"
    assert main(["fit", str(train), "--target", "label", "--text-columns", "text", "--id-column", "id",
                 "--models", "toy", "--folds", "2", "--meta", "average", "--no-progress",
                 "--run-dir", str(run_dir), "--corrections", str(fixes)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "1 label(s) changed" in out and "'nope'" in out
    assert "class 9" in [str(c) for c in StackingCategorizer.load(run_dir).classes_]
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
