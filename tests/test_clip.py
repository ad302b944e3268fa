"""ImageEmbeddingClassifier: estimator contract, missing-image policy, pickling, shared embedding cache."""

from __future__ import annotations

import io

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold

from stackcat.features.image_encoders import OpenClipEncoder, clear_loaded_models
from stackcat.features.images import clear_memory_cache
from stackcat.models.heads import TorchHeadClassifier
from stackcat.models.image import ImageEmbeddingClassifier

from contract import check_fitted_contract, check_sklearn_contract
from tiny_images import (
    CLASS_COLOURS,
    CountingEncoder,
    tiny_open_clip_dir,
    toy_image_dataset,
    write_truncated_jpeg,
)


@pytest.fixture
def toy(tmp_path):
    return toy_image_dataset(tmp_path / "images", per_class=6)


def stub_classifier(**params) -> ImageEmbeddingClassifier:
    params.setdefault("encoder", CountingEncoder())
    params.setdefault("normalize", "standard")
    return ImageEmbeddingClassifier(progress=False, **params)


def test_sklearn_checks_that_apply():
    check_sklearn_contract(ImageEmbeddingClassifier())


@pytest.mark.parametrize(("labels", "head"), [(None, "logistic"), ([10, 20, 30], "logistic"),
                                              (None, TorchHeadClassifier(learning_rate=0.05))])
def test_contract_on_a_dataframe(toy, tmp_path, labels, head):
    paths, y = toy
    if labels is not None:
        y = [labels[list(CLASS_COLOURS).index(v)] for v in y]
    frame = pd.DataFrame({"photo": paths, "other": range(len(paths))})
    clf = stub_classifier(image_column="photo", head=head)
    new = pd.DataFrame({"photo": paths[:4] + [None, str(tmp_path / "gone.jpg")]})
    proba = check_fitted_contract(clf, frame, y, new)
    assert (clf.predict(frame) == np.asarray(y)).mean() == 1.0
    np.testing.assert_allclose(proba[4], clf.class_prior_)


def test_plain_list_of_paths_and_learned_attributes(toy):
    paths, y = toy
    clf = stub_classifier(normalize="l2", C=100.0).fit(paths, y)
    assert clf.embedding_dim_ == 8 and clf.n_images_failed_ == 0
    assert clf.image_status_counts_["ok"] == len(paths)
    assert clf.scaler_ is None
    assert (clf.predict(paths) == np.asarray(y)).mean() > 0.9


def test_torch_head_by_name_or_as_an_estimator(toy):
    paths, y = toy
    clf = stub_classifier(head="torch", random_state=3, class_weight="balanced").fit(paths + [None], y + ["hat"])
    assert isinstance(clf.head_, TorchHeadClassifier)
    assert (clf.head_.random_state, clf.head_.class_weight) == (3, "balanced")
    assert list(clf.head_.classes_) == [1, 2, 3]  # "hat" only on the row without image
    given = TorchHeadClassifier(learning_rate=0.05, max_epochs=50)
    clf = stub_classifier(head=given).fit(paths, y)
    assert clf.head_ is not given and clf.head_.max_epochs == 50 and not hasattr(given, "coefs_")
    assert (clf.predict(paths) == np.asarray(y)).mean() == 1.0
    with pytest.raises(ValueError, match="head"):
        stub_classifier(head="sgd").fit(paths, y)


def test_flip_average_embeds_each_image_and_its_mirror_once(toy, tmp_path):
    from stackcat.features.image_encoders import MirroredEncoder
    from stackcat.features.images import image_embeddings

    paths, y = toy
    encoder = CountingEncoder()
    clf = stub_classifier(encoder=encoder, flip_average=True, image_cache_dir=tmp_path / "cache")
    clf.warm_cache(paths)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["counting", "counting"]
    calls = encoder.calls
    clf.fit(paths, y)
    assert encoder.calls == calls  # both views came from the cache
    plain = image_embeddings(paths, encoder, cache_dir=tmp_path / "cache", progress=False).embeddings
    mirrored = image_embeddings(paths, MirroredEncoder(encoder), cache_dir=tmp_path / "cache",
                                progress=False).embeddings
    np.testing.assert_allclose(clf._embed(np.array(paths, dtype=object)).embeddings, (plain + mirrored) / 2)
    assert (clf.predict(paths) == np.asarray(y)).mean() > 0.9
    np.testing.assert_allclose(clf.predict_proba([None]), [clf.class_prior_])


def test_rows_without_usable_image_get_the_training_prior(toy, tmp_path):
    paths, y = toy
    broken = str(write_truncated_jpeg(tmp_path / "cut.jpg"))
    X = paths + [None, broken, str(tmp_path / "missing.jpg")]
    y = y + ["shirt", "shirt", "jeans"]
    clf = stub_classifier().fit(X, y)
    assert clf.n_images_failed_ == 3
    assert clf.image_status_counts_ == {"ok": 18, "no_path": 1, "missing": 1, "too_large": 0,
                                        "corrupt": 1}
    expected_prior = np.array([y.count(c) for c in clf.classes_]) / len(y)
    np.testing.assert_allclose(clf.class_prior_, expected_prior)
    proba = clf.predict_proba([None, broken, float("nan"), paths[0]])
    np.testing.assert_allclose(proba[:3], np.tile(expected_prior, (3, 1)))
    assert clf.predict([paths[0]])[0] == "shirt"
    uniform = stub_classifier(missing_image="uniform").fit(X, y)
    np.testing.assert_allclose(uniform.predict_proba([None]), [[1 / 3] * 3])


def test_head_is_trained_only_on_usable_rows(toy, tmp_path):
    paths, y = toy
    X = paths + [None] * 5
    y = y + ["hat"] * 5  # a class seen only on rows without image
    clf = stub_classifier().fit(X, y)
    assert list(clf.classes_) == ["hat", "jeans", "shirt", "shoes"]
    assert list(clf.head_.classes_) == [1, 2, 3]
    proba = clf.predict_proba(paths[:3] + [None])
    assert (proba[:3, 0] == 0).all()  # the head never saw "hat"
    assert proba[3, 0] == pytest.approx(5 / 23)


def test_missing_image_error_names_rows(toy):
    paths, y = toy
    clf = stub_classifier(missing_image="error")
    with pytest.raises(ValueError, match=r"row 18: no_path"):
        clf.fit(paths + [None], y + ["shirt"])
    clf.fit(paths, y)
    with pytest.raises(ValueError, match="missing_image='error'"):
        clf.predict_proba([None])


def test_no_usable_image_at_all_is_a_clear_error(tmp_path):
    clf = stub_classifier(image_column="img")
    X = pd.DataFrame({"img": [None, str(tmp_path / "a.jpg")]})
    with pytest.raises(ValueError, match=r"none of the 2 training rows .* 'img'.*missing"):
        clf.fit(X, ["a", "b"])


def test_missing_column_is_named(toy):
    with pytest.raises(KeyError, match="'picture'"):
        stub_classifier(image_column="picture").fit(pd.DataFrame({"image_path": toy[0]}), toy[1])


def test_single_class_among_usable_rows(toy):
    paths, _ = toy
    clf = stub_classifier().fit(paths[:3] + [None], ["shirt"] * 3 + ["jeans"])
    proba = clf.predict_proba(paths[3:6])
    np.testing.assert_allclose(proba[:, list(clf.classes_).index("shirt")], 1.0)


def test_invalid_params_rejected_at_fit(toy):
    with pytest.raises(ValueError, match="normalize"):
        stub_classifier(normalize="max").fit(*toy)
    with pytest.raises(ValueError, match="encoder"):
        ImageEmbeddingClassifier(encoder=3).fit(*toy)


@pytest.mark.slow
def test_joblib_round_trip_gives_identical_probabilities(toy, tmp_path):
    paths, y = toy
    folder = tiny_open_clip_dir(tmp_path / "tiny")
    clf = ImageEmbeddingClassifier(encoder=f"local-dir:{folder}", device="cpu", progress=False)
    clf.fit(paths, y)
    assert isinstance(clf.encoder_, OpenClipEncoder)
    proba = clf.predict_proba(paths)
    buffer = io.BytesIO()
    joblib.dump(clf, buffer)
    assert buffer.tell() < 50_000, "the encoder must pickle as its settings, not its weights"
    buffer.seek(0)
    clear_memory_cache()
    clear_loaded_models()  # the restored model re-encodes with weights loaded afresh
    restored = joblib.load(buffer)
    np.testing.assert_allclose(restored.predict_proba(paths), proba, rtol=0, atol=1e-7)


def test_each_image_encoded_once_across_folds_and_models(toy, tmp_path):
    paths, y = toy
    encoder = CountingEncoder()
    cache = tmp_path / "cache"
    X, y = np.array(paths, dtype=object), np.array(y)
    for model in (stub_classifier(encoder=encoder, image_cache_dir=cache),
                  stub_classifier(encoder=encoder, image_cache_dir=cache, normalize="l2", C=3.0)):
        for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(X, y):
            clear_memory_cache()  # as if each fold ran in its own process
            fold_model = clone(model).fit(X[train], y[train])
            fold_model.predict_proba(X[test])
    assert encoder.max_encodings_per_image == 1
    assert len(encoder.encoded) == len(paths)


def test_n_threads_limits_threads_and_restores_them(toy):
    import torch

    before = torch.get_num_threads()
    seen = []

    class ThreadSpy(CountingEncoder):
        def encode(self, images):
            seen.append(torch.get_num_threads())
            return super().encode(images)

    stub_classifier(encoder=ThreadSpy(), n_threads=1).fit(*toy)
    assert seen == [1]
    assert torch.get_num_threads() == before


def test_encode_batch_size_is_the_images_per_encoder_call(toy):
    paths, y = toy
    encoder = CountingEncoder()
    stub_classifier(encoder=encoder, encode_batch_size=5).fit(paths, y)
    assert encoder.calls == -(-len(paths) // 5)


def test_warm_cache_encodes_every_image_once_for_later_folds(toy, tmp_path):
    paths, y = toy
    encoder = CountingEncoder()
    clf = stub_classifier(encoder=encoder, image_cache_dir=tmp_path / "cache")
    clf.warm_cache(paths)
    assert len(encoder.encoded) == len(paths) and encoder.max_encodings_per_image == 1
    calls = encoder.calls
    clear_memory_cache()
    clf.fit(paths, y).predict_proba(paths)
    assert encoder.calls == calls  # fit and predict only read the cache


def test_auto_head_is_logistic_up_to_the_class_threshold_and_torch_above(toy, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    from stackcat.models import image

    paths, y = toy  # 3 classes
    assert isinstance(stub_classifier().fit(paths, y).head_, LogisticRegression)
    monkeypatch.setattr(image, "TORCH_HEAD_ABOVE", 2)
    assert isinstance(stub_classifier().fit(paths, y).head_, TorchHeadClassifier)
    assert isinstance(stub_classifier(head="logistic").fit(paths, y).head_, LogisticRegression)
