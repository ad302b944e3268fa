from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stackcat.taxonomy import CategoryTree, TreeError, hierarchy_scores

KE_NODES = pd.DataFrame({
    "id": ["1", "10", "11", "100", "101", "110"],
    "parent_id": ["0", "1", "1", "10", "10", "11"],
    "title": ["Все категории", "Одежда", "Обувь", "Футболки", "Платья", "Кеды"],
})


def test_paths_give_ancestors_names_and_levels():
    tree = CategoryTree.from_paths(["Men > Topwear > Tshirts", "Men > Topwear > Shirts", "Women > Shoes > Flats"])
    assert tree.depth == 3
    assert tree.ancestors.shape == (3, 2)
    shirts, tshirts = 0, 1  # sorted classes
    assert tree.ancestors[shirts, 0] == tree.ancestors[tshirts, 0]  # siblings share the parent
    assert tree.ancestors[2, 1] != tree.ancestors[0, 1]
    assert tree.names[2] == "Women > Shoes > Flats"
    assert tree.level_labels(2).tolist() == ["Men", "Men", "Women"]


def test_tree_file_in_the_kazanexpress_shape(tmp_path):
    path = tmp_path / "tree.csv"
    KE_NODES.to_csv(path, index=False)
    tree = CategoryTree.read(path, [100, 101, 110])
    assert tree.names == ["Одежда > Футболки", "Одежда > Платья", "Обувь > Кеды"]  # the common root is dropped
    assert tree.ancestors[0, 0] == tree.ancestors[1, 0] != tree.ancestors[2, 0]
    aligned = tree.aligned(["110", "100", "101"])
    assert aligned.names[0] == "Обувь > Кеды"


def test_a_cycle_is_an_error_naming_the_category():
    nodes = pd.DataFrame({"id": ["5", "6", "7"], "parent_id": ["6", "7", "6"]})
    with pytest.raises(TreeError, match="cycle through category '5'"):
        CategoryTree.from_frame(nodes, ["5"])


def test_an_unknown_parent_is_an_error_naming_it():
    nodes = pd.DataFrame({"id": ["5"], "parent_id": ["99"]})
    with pytest.raises(TreeError, match="parent '99', which is not in the tree"):
        CategoryTree.from_frame(nodes, ["5"])


def test_a_label_missing_from_the_tree_is_an_error_naming_it():
    with pytest.raises(TreeError, match="category '777' is not a node"):
        CategoryTree.from_frame(KE_NODES, ["100", "777"])
    tree = CategoryTree.from_paths(["A > x", "A > y"])
    with pytest.raises(TreeError, match="'B > z'"):
        tree.aligned(["A > x", "B > z"])


def test_mixed_separators_are_an_error_naming_the_category():
    with pytest.raises(TreeError, match="'Men/Shoes'"):
        CategoryTree.from_paths(["Men > Topwear", "Men/Shoes"])


def test_hierarchy_scores_count_sibling_errors():
    tree = CategoryTree.from_paths(["A > x", "A > y", "B > z"])
    scores = hierarchy_scores(np.array([0, 0, 1, 2]), np.array([0, 1, 2, 2]), tree)
    assert scores["accuracy_level_0"] == 0.5
    assert scores["accuracy_level_1"] == 0.75
    assert scores["errors_under_right_parent"] == 0.5
