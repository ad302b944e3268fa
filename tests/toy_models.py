"""Small, fast, deterministic classifiers for engine tests (importable by subprocesses)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.naive_bayes import MultinomialNB

from stackcat.models._base import as_texts, column_values, encode_labels


class NaiveBayesText(ClassifierMixin, BaseEstimator):
    """Multinomial naive Bayes on word counts of a text column.

    ``calls_dir``: every fit leaves a file there (counts fits across processes);
    ``fail_if_exists``: fit raises while that file exists (a simulated crash);
    ``sleep``: seconds each fit waits (so a test can kill a run mid-way);
    ``forbidden_ids``: predict_proba raises if asked about rows it trained on.
    """

    def __init__(self, text_column="text", alpha=1.0, sleep=0.0, calls_dir=None,
                 fail_if_exists=None, check_no_leak=False):
        self.text_column = text_column
        self.alpha = alpha
        self.sleep = sleep
        self.calls_dir = calls_dir
        self.fail_if_exists = fail_if_exists
        self.check_no_leak = check_no_leak

    def fit(self, X, y):
        if self.fail_if_exists and Path(self.fail_if_exists).exists():
            raise RuntimeError("simulated crash during fit")
        if self.calls_dir:
            Path(self.calls_dir, f"fit-{os.getpid()}-{uuid.uuid4().hex}").touch()
        time.sleep(self.sleep)
        texts = as_texts(column_values(X, self.text_column))
        self.classes_, y_index = encode_labels(y, len(texts))
        self.vectorizer_ = CountVectorizer(token_pattern=r"\S+").fit(texts)
        self.nb_ = MultinomialNB(alpha=self.alpha).fit(self.vectorizer_.transform(texts), y_index)
        self.trained_ids_ = set(X["id"]) if self.check_no_leak else set()
        return self

    def predict_proba(self, X):
        if self.check_no_leak:
            leaked = self.trained_ids_.intersection(X["id"])
            assert not leaked, f"rows {sorted(leaked)[:5]} are predicted by a model that trained on them"
        texts = as_texts(column_values(X, self.text_column))
        proba = np.zeros((len(texts), len(self.classes_)))
        proba[:, self.nb_.classes_] = self.nb_.predict_proba(self.vectorizer_.transform(texts))
        return proba


def toy_table(n_per_class=12, n_classes=4, seed=0, rare=()):
    """A frame (id, text) and labels: class c's texts share the word w<c>, plus noise words.

    ``rare`` adds classes with the given member counts (e.g. (1, 2)).
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    texts, labels = [], []
    sizes = [n_per_class] * n_classes + list(rare)
    for label, size in enumerate(sizes):
        for _ in range(size):
            noise = " ".join(f"n{rng.integers(30)}" for _ in range(3))
            signal = f"w{label}" if rng.random() < 0.8 else f"w{rng.integers(len(sizes))}"
            texts.append(f"{signal} {noise}")
            labels.append(f"class {label}")
    order = rng.permutation(len(texts))
    frame = pd.DataFrame({"id": np.arange(len(texts)).astype(object), "text": np.array(texts, dtype=object)[order]},
                         dtype=object)
    return frame, np.array(labels, dtype=object)[order]


class BagOfWordsEmbedder(ClassifierMixin, BaseEstimator):
    """Nearest-centroid classifier on hashed bag-of-words vectors, with the ``embed`` interface
    the stack uses for retrieval signals (``embed(X)``, ``embed_texts(texts)``).

    ``calls_dir``: every embed call leaves a file there (counts encoder calls).
    """

    def __init__(self, text_column="text", dim=64, calls_dir=None):
        self.text_column = text_column
        self.dim = dim
        self.calls_dir = calls_dir

    def embed_texts(self, texts, prefix=None):
        if self.calls_dir:
            Path(self.calls_dir, f"embed-{os.getpid()}-{uuid.uuid4().hex}").touch()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in str(text).split():
                out[row, int.from_bytes(word.encode(), "little") % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)

    def embed(self, X):
        return self.embed_texts(as_texts(column_values(X, self.text_column)))

    def fit(self, X, y):
        embedded = self.embed(X)
        self.classes_, y_index = encode_labels(y, len(embedded))
        self.centroids_ = np.stack([embedded[y_index == c].mean(axis=0) for c in range(len(self.classes_))])
        return self

    def predict_proba(self, X):
        logits = 5.0 * self.embed(X) @ self.centroids_.T
        proba = np.exp(logits - logits.max(axis=1, keepdims=True))
        return proba / proba.sum(axis=1, keepdims=True)


class LookupProba(ClassifierMixin, BaseEstimator):
    """Returns fixed probabilities per product id (``table``: id -> row over ``classes``): exact OOF control."""

    def __init__(self, table=None, classes=None):
        self.table = table
        self.classes = classes

    def fit(self, X, y):
        self.classes_ = np.asarray(self.classes, dtype=object)
        return self

    def predict_proba(self, X):
        return np.array([self.table[i] for i in X["id"]], dtype=np.float64)


class CacheWarmingText(NaiveBayesText):
    """NaiveBayesText with a ``warm_cache`` that records which process warmed which rows
    (a file per call in ``warm_dir``: its name holds the pid, its text the row ids)."""

    def __init__(self, text_column="text", alpha=1.0, warm_dir=None):
        super().__init__(text_column=text_column, alpha=alpha)
        self.warm_dir = warm_dir

    def warm_cache(self, X):
        ids = " ".join(str(i) for i in X["id"])
        Path(self.warm_dir, f"warm-{os.getpid()}-{uuid.uuid4().hex}").write_text(ids)


def write_toy_csv(path, n_per_class=8, n_classes=4, seed=0, **columns):
    """:func:`toy_table` written as a generic CSV (id, text, label, and any extra ``columns``)."""
    X, y = toy_table(n_per_class=n_per_class, n_classes=n_classes, seed=seed)
    X["label"] = y
    for name, values in columns.items():
        X[name] = values
    X.to_csv(path, index=False)
    return path
