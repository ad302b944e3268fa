"""Look-alike categories: pairs confused both ways out of fold, with twin names or in two branches."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stackcat.lookalikes import (
    LOOKALIKE_COLUMNS,
    lookalike_categories,
    name_similarity,
    name_twins,
    read_lookalikes,
    singular_key,
)
from stackcat.taxonomy import CategoryTree

# one category under two names, towels in two branches, and two siblings with unrelated names
PATHS = ["Home > Bath > Towel", "Home > Bath > Towels", "Baby > Care > Towels", "Home > Bath > Bath Mats",
         "Home > Bath > Shower Curtains", "Women > Dresses", "Women > Dress"]


def confusions(classes, pairs, n_right=5):
    """Probabilities where each (true, predicted, count) of ``pairs`` happens ``count`` times, plus
    ``n_right`` right rows per class; returns (proba, y_index, ids)."""
    position = {c: i for i, c in enumerate(classes)}
    truth, predicted = [], []
    for c in classes:
        truth += [position[c]] * n_right
        predicted += [position[c]] * n_right
    for true, guess, count in pairs:
        truth += [position[true]] * count
        predicted += [position[guess]] * count
    proba = np.full((len(truth), len(classes)), 0.02)
    proba[np.arange(len(truth)), predicted] = 1.0
    proba /= proba.sum(axis=1, keepdims=True)
    return proba, np.array(truth), [f"product {i}, «{i}»" for i in range(len(truth))]


@pytest.fixture
def tree():
    return CategoryTree.from_paths(PATHS).aligned(np.array(sorted(PATHS), dtype=object))


def test_name_twins_on_a_tree_with_singular_plural_twins(tree):
    twins = name_twins(tree.classes, tree)
    found = {(a, b): (reason, same) for a, b, reason, same in twins.itertuples(index=False)}
    assert found == {
        ("Baby > Care > Towels", "Home > Bath > Towel"): ("singular/plural", False),
        ("Baby > Care > Towels", "Home > Bath > Towels"): ("same name", False),
        ("Home > Bath > Towel", "Home > Bath > Towels"): ("singular/plural", True),
        ("Women > Dress", "Women > Dresses"): ("singular/plural", True),
    }


def test_pairs_confused_both_ways_are_listed_with_why_and_what_to_do(tree):
    classes = list(tree.classes)
    proba, y, ids = confusions(classes, [
        ("Home > Bath > Towel", "Home > Bath > Towels", 4), ("Home > Bath > Towels", "Home > Bath > Towel", 3),
        ("Baby > Care > Towels", "Home > Bath > Towels", 2), ("Home > Bath > Towels", "Baby > Care > Towels", 1),
        ("Women > Dress", "Women > Dresses", 2),  # one way only: not listed
        ("Home > Bath > Bath Mats", "Home > Bath > Shower Curtains", 2),  # siblings, unrelated names
        ("Home > Bath > Shower Curtains", "Home > Bath > Bath Mats", 2)])
    pairs = lookalike_categories(proba, y, classes, tree=tree, ids=ids)

    assert pairs.columns.tolist() == list(LOOKALIKE_COLUMNS)
    listed = pairs[["category_a", "category_b", "a_as_b", "b_as_a", "reasons", "action"]].values.tolist()
    assert listed == [
        ["Home > Bath > Towel", "Home > Bath > Towels", 4, 3, "singular/plural", "merge"],
        ["Baby > Care > Towels", "Home > Bath > Towels", 2, 1, "same name; other branch", "clarify"],
    ]
    examples = json.loads(pairs.loc[0, "examples_a_as_b"])
    assert len(examples) == 3 and all(ids.index(e) >= 5 * len(classes) for e in examples)


def test_without_a_tree_the_labels_are_the_names():
    classes = ["Kurtas", "Kurtis", "Shoes", "Socks"]
    proba, y, _ = confusions(classes, [("Kurtas", "Kurtis", 2), ("Kurtis", "Kurtas", 2),
                                       ("Shoes", "Socks", 1), ("Socks", "Shoes", 1)])
    pairs = lookalike_categories(proba, y, classes)
    assert pairs[["category_a", "category_b", "reasons"]].values.tolist() == [["Kurtas", "Kurtis", "similar names"]]
    assert lookalike_categories(proba, y, classes, min_each_way=3).empty


def test_nearest_names_come_from_the_name_embeddings():
    classes = ["Sneakers", "Trainers", "Shirts"]
    embeddings = np.array([[1.0, 0.1, 0.0], [0.9, 0.2, 0.0], [0.0, 0.0, 1.0]])
    proba, y, _ = confusions(classes, [("Sneakers", "Trainers", 1), ("Trainers", "Sneakers", 1)])
    pairs = lookalike_categories(proba, y, classes, name_embeddings=embeddings)
    assert pairs["reasons"].tolist() == ["nearest names"] and pairs["name_cosine"].iloc[0] > 0.9


def test_names_normalize_case_accents_and_plurals():
    assert singular_key("Baby Towels") == singular_key("baby  TOWEL") == "baby towel"
    assert singular_key("Accessories") == "accessory" and singular_key("Dresses") == "dress"
    assert singular_key("Glass") == "glass" and singular_key("Bus") == "bus"
    assert name_similarity("Café", "cafe") == 1.0 and name_similarity("Tops", "Rugs") < 0.8


def test_the_csv_round_trips(tree, tmp_path):
    classes = list(tree.classes)
    proba, y, ids = confusions(classes, [("Home > Bath > Towel", "Home > Bath > Towels", 1),
                                         ("Home > Bath > Towels", "Home > Bath > Towel", 1)])
    pairs = lookalike_categories(proba, y, classes, tree=tree, ids=ids)
    path = tmp_path / "pairs.csv"
    pairs.to_csv(path, index=False)
    back = read_lookalikes(path)
    pd.testing.assert_frame_equal(back, pairs, check_dtype=False)
    assert json.loads(back.loc[0, "examples_a_as_b"])[0] in ids
