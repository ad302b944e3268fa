"""NeighboursClassifier: contract, exact search against brute force, votes, shared embedding caches."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

from stackcat.features import text_states
from stackcat.features.hub import load_text_encoder
from stackcat.features.images import clear_memory_cache as clear_image_cache
from stackcat.features.store import count_entries
from stackcat.features.text_states import clear_memory_cache as clear_text_cache
from stackcat.models.bert import BertClassifier
from stackcat.models.image import ImageEmbeddingClassifier
from stackcat.models.neighbours import (
    NeighboursClassifier,
    faiss_nearest_neighbours,
    l2_normalized,
    nearest_neighbours,
    neighbour_votes,
)

from contract import check_fitted_contract, check_sklearn_contract
from tiny_bert import CountingLoader, build_tiny_bert
from tiny_images import CountingEncoder, FailingEncoder, toy_image_dataset

KINDS = {"shirt": "red cotton shirt", "jeans": "blue denim jeans",
         "wallet": "black leather wallet", "shoes": "white running shoes"}
FILLER = ["", "men", "summer casual", "light dark kids women"]
NO_FAISS = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss-cpu is not installed")


def toy_texts() -> tuple[list[str], list[str]]:
    rows = [(f"{words} {filler} {i}".strip(), label)
            for i in range(2) for filler in FILLER for label, words in KINDS.items()]
    return [t for t, _ in rows], [label for _, label in rows]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), toy_texts()[0]))


@pytest.fixture
def toy_images(tmp_path):
    return toy_image_dataset(tmp_path / "images", per_class=6)


def image_knn(**params) -> NeighboursClassifier:
    return NeighboursClassifier(**{"source": "image", "encoder": CountingEncoder(), "progress": False, **params})


def text_knn(model_name, **params) -> NeighboursClassifier:
    return NeighboursClassifier(**{"source": "text", "model_name": model_name, "max_length": 32,
                                   "progress": False, **params})


def brute_force_proba(queries, index, index_labels, n_classes, k, temperature, smoothing, prior):
    """Every cosine, a full sort, softmax weights over the top k: the textbook definition."""
    proba = np.zeros((len(queries), n_classes))
    for row, query in enumerate(queries):
        cosines = index @ query
        top = np.argsort(-cosines)[:k]
        weights = np.exp((cosines[top] - cosines[top].max()) / temperature)
        for position, weight in zip(top, weights / weights.sum()):
            proba[row, index_labels[position]] += weight
    return (1 - smoothing) * proba + smoothing * prior


# --- search and votes -------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_exact_search_matches_a_full_sort_whatever_the_chunks(chunk_size, k):
    rng = np.random.default_rng(0)
    index = l2_normalized(rng.normal(size=(40, 6)))
    queries = l2_normalized(rng.normal(size=(23, 6)))
    similarities, positions = nearest_neighbours(queries, index, k, chunk_size=chunk_size)
    full = queries @ index.T
    expected = np.argsort(-full, axis=1)[:, :k]
    np.testing.assert_array_equal(positions, expected)
    # float32 cosines: a one-row chunk (matrix-vector) rounds differently from the full product
    np.testing.assert_allclose(similarities, np.take_along_axis(full, expected, axis=1), rtol=0, atol=1e-6)
    assert similarities.dtype == np.float32 and positions.shape == (23, k)


def test_more_neighbours_than_rows_is_every_row():
    index = l2_normalized(np.eye(3))
    similarities, positions = nearest_neighbours(index[:1], index, 10)
    assert positions.tolist() == [[0, 1, 2]] and similarities.tolist() == [[1.0, 0.0, 0.0]]


@NO_FAISS
def test_faiss_backend_finds_the_same_neighbours():
    rng = np.random.default_rng(1)
    index = l2_normalized(rng.normal(size=(50, 8)))
    queries = l2_normalized(rng.normal(size=(9, 8)))
    sims, rows = faiss_nearest_neighbours(queries, index, 5)
    ref_sims, ref_rows = nearest_neighbours(queries, index, 5)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


def test_temperature_moves_votes_from_nearest_only_to_equal_shares():
    similarities = np.array([[0.9, 0.8, 0.7, 0.6]])
    labels = np.array([[0, 1, 1, 1]])
    cold = neighbour_votes(similarities, labels, 3, temperature=1e-3)
    hot = neighbour_votes(similarities, labels, 3, temperature=1e3)
    warm = neighbour_votes(similarities, labels, 3, temperature=0.1)
    np.testing.assert_allclose(cold, [[1.0, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(hot, [[0.25, 0.75, 0.0]], atol=1e-3)
    expected_first = np.exp(9) / np.exp([9, 8, 7, 6]).sum()
    np.testing.assert_allclose(warm, [[expected_first, 1 - expected_first, 0.0]])


# --- the estimator on images ------------------------------------------------------------


def test_sklearn_checks_that_apply():
    check_sklearn_contract(NeighboursClassifier())


@pytest.mark.parametrize("labels", [None, [10, 20, 30]])
def test_contract_on_images(toy_images, tmp_path, labels):
    paths, y = toy_images
    if labels is not None:
        y = [labels[sorted(set(y)).index(v)] for v in y]
    frame = pd.DataFrame({"photo": paths})
    knn = image_knn(image_column="photo", n_neighbors=3)
    new = pd.DataFrame({"photo": paths[:4] + [None, str(tmp_path / "gone.jpg")]})
    proba = check_fitted_contract(knn, frame, y, new)
    np.testing.assert_allclose(proba[4:], np.tile(knn.class_prior_, (2, 1)))
    assert (knn.predict(frame) == np.asarray(y)).all()


@pytest.mark.parametrize("backend", ["numpy", pytest.param("faiss", marks=NO_FAISS)])
def test_probabilities_match_a_brute_force_reference(toy_images, backend):
    paths, y = toy_images
    knn = image_knn(n_neighbors=4, temperature=0.02, smoothing=0.05, chunk_size=5, backend=backend)
    knn.fit(paths[:12], y[:12])
    train_vectors = knn.embed(paths[:12])
    np.testing.assert_allclose(knn.index_.astype(np.float32), train_vectors, atol=1e-3)
    expected = brute_force_proba(knn.embed(paths[12:]), knn.index_.astype(np.float32), knn.index_labels_,
                                 len(knn.classes_), 4, 0.02, 0.05, knn.class_prior_)
    np.testing.assert_allclose(knn.predict_proba(paths[12:]), expected, atol=1e-6)
    np.testing.assert_allclose(knn.set_params(chunk_size=1000).predict_proba(paths[12:]), expected, atol=1e-6)


def test_the_float32_index_is_made_once_per_fitted_index(toy_images, monkeypatch):
    paths, y = toy_images
    knn = image_knn(n_neighbors=3).fit(paths[:12], y[:12])
    first = knn.predict_proba(paths[12:])
    index = knn._float32_index()
    np.testing.assert_array_equal(index, knn.index_.astype(np.float32))
    assert knn._float32_index() is index
    np.testing.assert_array_equal(knn.predict_proba(paths[12:]), first)
    knn.fit(paths[6:], y[6:])  # a new index_: converted again
    assert knn._float32_index() is not index and len(knn._float32_index()) == len(knn.index_)
    assert "_float32" not in str(vars(knn))  # kept beside the model: its pickle and bundle stay as they were


def test_smoothing_keeps_every_class_above_zero(toy_images):
    paths, y = toy_images
    smoothed = image_knn(n_neighbors=2).fit(paths, y).predict_proba(paths)
    raw = image_knn(n_neighbors=2, smoothing=0.0).fit(paths, y).predict_proba(paths)
    assert smoothed.min() >= 0.01 * min(np.unique(y, return_counts=True)[1]) / len(y) - 1e-12
    assert (raw == 0).any()


def test_rows_without_an_image_are_left_out_of_the_index(toy_images):
    paths, y = toy_images
    knn = image_knn().fit(paths + [None, None], y + ["hat", "hat"])
    assert len(knn.index_) == len(paths) and "hat" in knn.classes_
    embedded = knn.embed([None, paths[0]])
    assert not embedded[0].any() and np.linalg.norm(embedded[1]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="none of the 2 training rows .* 'image_path'"):
        image_knn().fit([None, None], ["a", "b"])


def test_reuses_the_image_embeddings_of_the_clip_member(toy_images, tmp_path):
    paths, y = toy_images
    encoder = CountingEncoder()
    ImageEmbeddingClassifier(encoder=encoder, image_cache_dir=tmp_path, progress=False).fit(paths, y)
    calls = encoder.calls
    clear_image_cache()  # only the disk cache is shared now
    knn = image_knn(encoder=FailingEncoder(name=encoder.name), image_cache_dir=tmp_path).fit(paths, y)
    knn.predict_proba(paths)
    assert knn.embed(paths).shape == (len(paths), encoder.dim)
    assert encoder.calls == calls and encoder.max_encodings_per_image == 1


def test_each_source_reads_its_own_cache_folder(toy_images, tmp_path):
    paths, y = toy_images
    image_knn(image_cache_dir=tmp_path / "images", text_cache_dir=tmp_path / "texts").fit(paths, y)
    assert count_entries(tmp_path / "images") == len(paths) and not (tmp_path / "texts").exists()


def test_encode_batch_size_sizes_the_encoder_passes(toy_images):
    paths, y = toy_images
    image_knn(encoder=(encoder := CountingEncoder()), encode_batch_size=7).fit(paths, y)
    assert encoder.calls == -(-len(paths) // 7)


# --- the estimator on texts -------------------------------------------------------------


def test_contract_on_texts(tiny_model):
    texts, y = toy_texts()
    knn = text_knn(tiny_model, n_neighbors=3)
    check_fitted_contract(knn, pd.DataFrame({"text": texts}), y, ["red cotton shirt", "", "denim"])
    assert (knn.predict(texts) == np.asarray(y)).mean() > 0.5


def test_reuses_the_text_states_of_the_frozen_bert_member(tiny_model, tmp_path, monkeypatch):
    texts, y = toy_texts()
    monkeypatch.setenv("STACKCAT_ENCODER_BACKEND", "torch")  # the torch loader is the one watched
    counting = CountingLoader(load_text_encoder)
    monkeypatch.setattr(text_states, "load_text_encoder", counting)
    BertClassifier(model_name=tiny_model, freeze_encoder=True, epochs=1, max_length=32, text_prefix="passage: ",
                   text_cache_dir=tmp_path, progress=False, n_threads=1).fit(texts, y)
    encoded = sum(counting.encoded.values())
    clear_text_cache()
    knn = text_knn(tiny_model, text_prefix="passage: ", text_cache_dir=tmp_path)
    unfitted_vectors = knn.embed(texts)
    knn.fit(texts, y).predict_proba(texts)
    assert sum(counting.encoded.values()) == encoded == len(set(texts))
    np.testing.assert_allclose(np.linalg.norm(unfitted_vectors, axis=1), 1.0, atol=1e-5)
    assert unfitted_vectors.dtype == np.float32


def test_embed_texts_prefix_defaults_to_text_prefix(tiny_model):
    knn = text_knn(tiny_model, text_prefix="red ")  # words the tiny tokenizer knows
    np.testing.assert_array_equal(knn.embed_texts(["shirt"]), knn.embed(["shirt"]))
    np.testing.assert_array_equal(knn.embed_texts(["shirt"], prefix="blue "),
                                  text_knn(tiny_model).embed(["blue shirt"]))
    assert not np.allclose(knn.embed_texts(["shirt"], prefix="blue "), knn.embed_texts(["shirt"]))


def test_a_changed_text_model_is_refused(tiny_model, tmp_path):
    texts, y = toy_texts()
    knn = text_knn(tiny_model).fit(texts, y)
    knn.text_model_identity_ = "0" * 32
    with pytest.raises(ValueError, match="has changed since this model was fitted"):
        knn.predict_proba(texts[:2])


@pytest.mark.dask
def test_text_encoding_on_a_cluster_equals_a_local_run(tiny_model, tmp_path):
    """The frozen text encoder runs on the dask workers (sharded rows, shared cache folder); the
    stack's OOF equal a local run's."""
    distributed = pytest.importorskip("distributed")
    from stackcat.stacking import StackingCategorizer

    texts, y = toy_texts()
    X = pd.DataFrame({"id": range(len(texts)), "text": texts})

    def stack(cache_dir, **params):
        knn = NeighboursClassifier(source="text", model_name=tiny_model, max_length=32,
                                   text_cache_dir=str(cache_dir), progress=False)
        return StackingCategorizer([("knn", knn)], meta="average", n_splits=3, progress=False, verbose=0,
                                   retrieval=False, **params)

    local = stack(tmp_path / "local").fit(X, y)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None, processes=True) as cluster:
        on_cluster = stack(tmp_path / "cluster", scheduler=cluster.scheduler_address, n_jobs=-1).fit(X, y)
    np.testing.assert_allclose(local.oof_["knn"], on_cluster.oof_["knn"], atol=1e-4)
    assert count_entries(tmp_path / "cluster") == len(set(texts))
