"""TfidfClassifier: TF-IDF word and character n-grams into a multinomial logistic regression."""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from stackcat.models._base import (
    ProbaClassifierMixin,
    as_texts,
    column_values,
    encode_labels,
    normalize_rows,
)

SOLVERS = ("saga", "lbfgs", "sag", "newton-cg")
# max_iter="auto": each saga pass costs rows x classes, so many classes get fewer passes. On 855
# label-crossed Myntra classes 5 passes made 7% more errors than 10 for half the CPU, 3 passes 36% more.
AUTO_PASSES, AUTO_PASSES_MANY_CLASSES, MANY_CLASSES = 10, 5, 300


def auto_passes(n_classes: int) -> int:
    """Solver passes of ``max_iter="auto"`` for ``n_classes`` classes.

    Examples
    --------
    >>> auto_passes(143), auto_passes(874)
    (10, 5)
    """
    return AUTO_PASSES if n_classes <= MANY_CLASSES else AUTO_PASSES_MANY_CLASSES


def tfidf_features(word_ngrams: tuple[int, int] = (1, 2), char_ngrams: tuple[int, int] | None = (2, 5),
                   min_df: int = 2, max_features: int | None = 300_000,
                   sublinear_tf: bool = True) -> FeatureUnion:
    """An unfitted union of word and ``char_wb`` TF-IDF vectorizers (float32, lower-cased).

    ``char_ngrams=None`` leaves the character n-grams out; ``max_features`` caps each
    vectorizer's vocabulary (the most frequent terms are kept).

    Examples
    --------
    >>> features = tfidf_features(min_df=1).fit(["red shirt", "blue jeans"])
    >>> features.transform(["red jeans"]).shape[0]
    1
    """
    parts = [("word", TfidfVectorizer(analyzer="word", ngram_range=tuple(word_ngrams), min_df=min_df,
                                      max_features=max_features, sublinear_tf=sublinear_tf,
                                      token_pattern=r"(?u)\b\w+\b", dtype=np.float32))]
    if char_ngrams is not None:
        parts.append(("char", TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(char_ngrams),
                                              min_df=min_df, max_features=max_features,
                                              sublinear_tf=sublinear_tf, dtype=np.float32)))
    return FeatureUnion(parts)


def _coefficients_by_column(head: LogisticRegression) -> None:
    """Store ``head.coef_`` in Fortran order (once): the same values and probabilities.

    ``sparse_rows @ coef_.T`` needs ``coef_.T`` C-contiguous, and scipy copied the
    whole ``(n_classes, n_features)`` matrix on every call otherwise (the larger
    part of one product's time in this member).
    """
    if not head.coef_.T.flags.c_contiguous:
        head.coef_ = np.asfortranarray(head.coef_)


class TfidfClassifier(ProbaClassifierMixin, ClassifierMixin, BaseEstimator):
    """TF-IDF word 1-2-grams and ``char_wb`` 2-5-grams into a multinomial logistic regression.

    A cheap lexical member: it reads the exact words, codes and spellings of a
    product text that a sentence encoder smooths away, so its errors differ from
    the neural members'. The logistic regression is multinomial (one softmax over
    all classes), so its probabilities are usable by a meta-learner as they are.

    Parameters
    ----------
    text_column : str, default="text"
        Column of X holding the text (X may also be a plain list of strings).
    word_ngrams : tuple of int, default=(1, 2)
        Range of word n-grams (words: runs of letters and digits, single characters kept).
    char_ngrams : tuple of int or None, default=(2, 5)
        Range of character n-grams inside word boundaries (``char_wb``); None: words only.
    min_df : int, default=2
        Terms in fewer training texts are dropped.
    max_features : int or None, default=300_000
        Vocabulary cap of each of the two vectorizers (most frequent terms kept).
    sublinear_tf : bool, default=True
        ``1 + log(tf)`` instead of the raw term count.
    C : float, default=20.0
        Inverse regularization strength of the logistic regression.
    solver : {"saga", "lbfgs", "sag", "newton-cg"}, default="saga"
        The logistic regression's solver. ``"saga"`` is the fastest on tens of
        thousands of product texts at the same F1 (experiments/results/lexical.md).
    max_iter : int or "auto", default="auto"
        Passes (saga, sag) or iterations (lbfgs, newton-cg) at most. Stopping before
        full convergence is deliberate: on Myntra 10 saga passes give the F1 and
        calibration of 30 in a third of the time (lexical.md), so no
        ``ConvergenceWarning`` is raised for it; ``n_iter_`` says how many ran.
        ``"auto"``: 10 up to 300 classes, 5 above (:func:`auto_passes`; on 855
        classes 7% more errors than 10 passes for half the CPU, experiments/RESULTS.md,
        "Fit time at scale").
    tol : float, default=1e-3
        Stopping tolerance of the solver.
    class_weight : dict, "balanced" or None, default=None
    random_state : int or None, default=0
        Seed of the stochastic solvers' sample order.

    Attributes
    ----------
    classes_ : ndarray
        The labels, sorted; columns of ``predict_proba`` follow this order.
    features_ : FeatureUnion
        The fitted vectorizers.
    n_features_ : int
        Columns of the TF-IDF matrix (words + character n-grams).
    head_ : LogisticRegression or None
        Trained on class indices; None when the training data hold a single class.
    n_iter_ : int
        Iterations the solver ran (0 for a single class).

    Examples
    --------
    >>> clf = TfidfClassifier(min_df=1).fit(["red cotton shirt", "blue denim jeans"] * 5,
    ...                                      ["shirt", "jeans"] * 5)
    >>> clf.predict(["cotton shirt"]).tolist()
    ['shirt']
    """

    # params that change how fast, not what, it learns: left out of the run folder's job keys
    _runtime_params = ()

    _parameter_constraints: dict = {
        "text_column": [str],
        "word_ngrams": [tuple],
        "char_ngrams": [tuple, None],
        "min_df": [Interval(Integral, 1, None, closed="left")],
        "max_features": [Interval(Integral, 1, None, closed="left"), None],
        "sublinear_tf": ["boolean"],
        "C": [Interval(Real, 0, None, closed="neither")],
        "solver": [StrOptions(set(SOLVERS))],
        "max_iter": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "random_state": [Interval(Integral, 0, None, closed="left"), None],
    }

    def __init__(
        self,
        text_column: str = "text",
        word_ngrams: tuple[int, int] = (1, 2),
        char_ngrams: tuple[int, int] | None = (2, 5),
        min_df: int = 2,
        max_features: int | None = 300_000,
        sublinear_tf: bool = True,
        C: float = 20.0,
        solver: str = "saga",
        max_iter: int | str = "auto",
        tol: float = 1e-3,
        class_weight: dict | str | None = None,
        random_state: int | None = 0,
    ) -> None:
        self.text_column = text_column
        self.word_ngrams = word_ngrams
        self.char_ngrams = char_ngrams
        self.min_df = min_df
        self.max_features = max_features
        self.sublinear_tf = sublinear_tf
        self.C = C
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> TfidfClassifier:
        """Learn the vocabularies and the logistic regression from texts ``X`` and labels ``y``."""
        texts = self._texts(X)
        self.classes_, y_index = encode_labels(y, len(texts))
        self.features_ = self._make_features(len(texts))
        try:
            features = self.features_.fit_transform(texts)
        except ValueError as exc:  # sklearn's "empty vocabulary" says nothing about which column
            raise ValueError(f"no term of the {len(texts)} training texts (column {self.text_column!r}) "
                             f"is usable: {exc}") from exc
        self.n_features_ = int(features.shape[1])
        self.head_ = self._fit_head(features, y_index) if len(self.classes_) > 1 else None
        self.n_iter_ = int(np.max(self.head_.n_iter_)) if self.head_ is not None else 0
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities ``(n_samples, n_classes)`` in ``classes_`` order; rows sum to 1."""
        check_is_fitted(self, "features_")
        texts = self._texts(X)
        if self.head_ is None:
            return np.ones((len(texts), 1))
        if not texts:
            return np.zeros((0, len(self.classes_)))
        _coefficients_by_column(self.head_)
        return normalize_rows(self.head_.predict_proba(self.features_.transform(texts)))

    def _texts(self, X: Any) -> list[str]:
        return as_texts(column_values(X, self.text_column, what="text"))

    def _make_features(self, n_texts: int) -> FeatureUnion:
        # One text cannot meet min_df=2: tiny data keeps every term rather than none.
        min_df = min(self.min_df, n_texts)
        return tfidf_features(self.word_ngrams, self.char_ngrams, min_df, self.max_features,
                              self.sublinear_tf)

    def _fit_head(self, features: sparse.spmatrix, y_index: np.ndarray) -> LogisticRegression:
        passes = auto_passes(len(self.classes_)) if self.max_iter == "auto" else self.max_iter
        head = LogisticRegression(C=self.C, solver=self.solver, max_iter=passes, tol=self.tol,
                                  class_weight=self.class_weight, random_state=self.random_state)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=ConvergenceWarning)
            return head.fit(features, y_index)

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags
