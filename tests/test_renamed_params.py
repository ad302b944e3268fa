"""Pickles made before the parameter renames load under the new names, with no warning."""

from __future__ import annotations

import pickle
import warnings

import pytest

from stackcat._deprecated import DEPRECATED, renamed_param, upgrade_renamed
from stackcat.meta import MulticlassMeta, RerankMeta
from stackcat.models.fasttext import FastTextClassifier
from stackcat.models.image import ImageEmbeddingClassifier
from stackcat.models.neighbours import NeighboursClassifier

# (estimator, {old name: (new name, value the old release had stored)})
CASES = [
    (FastTextClassifier(), {"thread": ("n_threads", 1)}),
    (ImageEmbeddingClassifier(), {"n_jobs": ("n_threads", 2), "batch_size": ("encode_batch_size", 16),
                                  "cache_dir": ("image_cache_dir", "/runs/a/embeddings")}),
    (NeighboursClassifier(source="text"), {"batch_size": ("encode_batch_size", 8),
                                           "cache_dir": ("text_cache_dir", "/runs/a/embeddings")}),
    (NeighboursClassifier(source="image"), {"batch_size": ("encode_batch_size", 8),
                                            "cache_dir": ("image_cache_dir", "/runs/a/embeddings")}),
    (MulticlassMeta(), {"thread_count": ("n_threads", -1)}),
    (RerankMeta(), {"thread_count": ("n_threads", 3)}),
]


def state_before_the_rename(estimator, renames):
    """The pickled state an older release wrote: the old names hold values, the new ones do not exist."""
    state = estimator.__getstate__()
    for old, (new, value) in renames.items():
        del state[new]
        state[old] = value
    return state


@pytest.mark.parametrize(("estimator", "renames"), CASES,
                         ids=["fasttext", "image", "knn_text", "knn_image", "multiclass", "rerank"])
def test_an_old_pickle_loads_under_the_new_names_without_a_warning(estimator, renames):
    restored = type(estimator).__new__(type(estimator))
    restored.__setstate__(state_before_the_rename(estimator, renames))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for old, (new, value) in renames.items():
            assert getattr(restored, old) == DEPRECATED
            assert renamed_param(restored, old, new) == value
    assert pickle.loads(pickle.dumps(restored)).get_params() == restored.get_params()


def test_a_new_name_already_present_wins_and_the_first_old_name_fills_a_shared_one():
    assert upgrade_renamed({"n_threads": 4, "thread": 1}, [("thread", "n_threads")]) == {"n_threads": 4, "thread": 1}
    merged = upgrade_renamed({"predict_batch_size": 7, "image_batch_size": 3},
                             [("predict_batch_size", "encode_batch_size"), ("image_batch_size", "encode_batch_size")])
    assert merged == {"predict_batch_size": DEPRECATED, "image_batch_size": DEPRECATED, "encode_batch_size": 7}
