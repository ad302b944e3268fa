"""TfidfClassifier: estimator contract, features, probabilities."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression

from stackcat.core import normalize_rows
from stackcat.models.lexical import TfidfClassifier, tfidf_features

from contract import check_fitted_contract, check_sklearn_contract

TEXTS = ["red cotton shirt", "blue denim jeans", "leather wallet brown", "running shoes light"]


def small_data(labels, repeat: int = 6):
    texts = [f"{t} {i}" for i in range(repeat) for t in TEXTS]
    y = [labels[j] for _ in range(repeat) for j in range(4)]
    return texts, y


def test_sklearn_checks_that_apply():
    check_sklearn_contract(TfidfClassifier())


@pytest.mark.parametrize("labels", [["a shirt", "jeans & co", "wallet", "shoes"], [10, 20, 30, 40]])
def test_contract_any_label_type(labels):
    X, y = small_data(labels)
    clf = TfidfClassifier()
    check_fitted_contract(clf, X, y, ["cotton shirt", "denim", "new\nline text", ""])
    assert clf.predict(["red cotton shirt"])[0] == labels[0]
    assert clf.n_iter_ >= 1 and clf.n_features_ > 0


def test_reads_the_named_column_of_a_dataframe():
    X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    frame = pd.DataFrame({"desc": X, "other": ["wallet"] * len(X)})
    clf = TfidfClassifier(text_column="desc").fit(frame, y)
    assert (clf.predict(frame) == np.array(y)).all()
    with pytest.raises(KeyError, match="'body'"):
        TfidfClassifier(text_column="body").fit(frame, y)


def test_probabilities_are_the_multinomial_logistic_regressions_on_the_tfidf_features():
    X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    clf = TfidfClassifier(C=3.0, solver="lbfgs", max_iter=200, tol=1e-6).fit(X, y)
    # fit_transform, as the classifier does: its sparse rows sum in another order than transform's,
    # and a loosely converged lbfgs (scikit-learn 1.9) carries that difference to the 4th decimal
    features = tfidf_features(min_df=2)
    reference = LogisticRegression(C=3.0, max_iter=200, tol=1e-6).fit(features.fit_transform(X), y)
    new = ["cotton jeans", "brown shoes 3"]
    np.testing.assert_allclose(clf.predict_proba(new), reference.predict_proba(features.transform(new)), atol=1e-4)


def test_coefficients_are_kept_by_column_for_sparse_rows_with_the_same_probabilities():
    X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    clf = TfidfClassifier().fit(X, y)
    clf.head_.coef_ = np.ascontiguousarray(clf.head_.coef_)  # as a fit or a bundle may leave it
    new = ["cotton jeans", "brown shoes 3"]
    expected = clf.head_.predict_proba(clf.features_.transform(new))
    proba = clf.predict_proba(new)
    assert clf.head_.coef_.T.flags.c_contiguous
    np.testing.assert_array_equal(proba, normalize_rows(expected))
    np.testing.assert_array_equal(clf.predict_proba(new), proba)


def test_words_and_character_ngrams_both_count():
    clf = TfidfClassifier(min_df=1).fit(["red shirt", "blue jeans"], ["s", "j"])
    names = clf.features_.get_feature_names_out()
    assert "word__red shirt" in names and "char__shir" in names
    words_only = TfidfClassifier(min_df=1, char_ngrams=None).fit(["red shirt", "blue jeans"], ["s", "j"])
    assert not any(name.startswith("char__") for name in words_only.features_.get_feature_names_out())
    # a misspelling shares character n-grams only
    spelled = TfidfClassifier(min_df=1, C=100.0).fit(["tshirt", "trousers"] * 3, ["top", "bottom"] * 3)
    assert spelled.predict(["tshirts"])[0] == "top"


def test_probabilities_get_sharper_with_less_regularization():
    X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    soft = TfidfClassifier(C=0.1).fit(X, y).predict_proba(X).max(axis=1).mean()
    sharp = TfidfClassifier(C=100.0).fit(X, y).predict_proba(X).max(axis=1).mean()
    assert soft < 0.5 < sharp


def test_single_class_and_tiny_data():
    clf = TfidfClassifier().fit(["only one text"], ["x"])  # min_df is capped by the row count
    np.testing.assert_array_equal(clf.predict_proba(["anything", ""]), [[1.0], [1.0]])
    assert clf.predict(["b"]).tolist() == ["x"]


def test_no_usable_term_names_the_column():
    with pytest.raises(ValueError, match="column 'text'.*usable"):
        TfidfClassifier(char_ngrams=None).fit(["", "!"], ["a", "b"])


def test_invalid_param_rejected_at_fit_not_init():
    clf = TfidfClassifier(solver="liblinear")
    with pytest.raises(ValueError, match="solver"):
        clf.fit(["a b"], ["x"])


def test_repeatable():
    X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    a = clone(TfidfClassifier()).fit(X, y).predict_proba(X)
    b = clone(TfidfClassifier()).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)


def test_auto_passes_are_fewer_above_the_class_threshold(monkeypatch):
    from stackcat.models import lexical

    X = ["red cotton shirt", "blue denim jeans", "green wool hat"] * 20
    y = ["shirt", "jeans", "hat"] * 20
    tight = {"tol": 1e-12, "random_state": 0}  # no early stop: every allowed pass runs
    assert TfidfClassifier(**tight).fit(X, y).n_iter_ == lexical.AUTO_PASSES
    monkeypatch.setattr(lexical, "MANY_CLASSES", 2)
    assert TfidfClassifier(**tight).fit(X, y).n_iter_ == lexical.AUTO_PASSES_MANY_CLASSES
    assert TfidfClassifier(max_iter=7, **tight).fit(X, y).n_iter_ == 7
