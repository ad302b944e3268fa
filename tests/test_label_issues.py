"""Suspected label errors from the out-of-fold probabilities: found when planted, rare when absent, exact CSV."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stackcat.data import TableSpec, prepare_table
from stackcat.label_issues import (
    LABEL_ISSUE_COLUMNS,
    LABEL_ISSUES,
    THUMBNAILS,
    confident_thresholds,
    rank_label_issues,
    read_label_issues,
    write_label_issues,
)
from stackcat.report import catalogue_sections, write_run_report
from stackcat.stacking import StackingCategorizer
from stackcat.topk import top_k_rows

from tiny_images import write_image
from toy_models import NaiveBayesText

SPEC = TableSpec(text_columns=["text"], target="label", id_column="id", image_column="image")
# labels and ids a CSV must not bend: commas, quotes, line breaks, non-ASCII, words pandas reads as missing
AWKWARD_LABELS = ["shirts, red", 'jeans "slim"\nblue', "Платья", "NA", " caps "]


def words_table(labels, n_per_class=14, seed=0):
    """Products whose text names their class (word k<c> plus noise): a stack gets them right."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, label in enumerate(labels):
        for i in range(n_per_class):
            noise = " ".join(f"n{rng.integers(40)}" for _ in range(2))
            rows.append({"id": f"p{c}-{i}", "text": f"k{c} k{c}x k{c}y {noise}", "label": label})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def fit_stack(frame):
    stack = StackingCategorizer([("nb", NaiveBayesText(alpha=0.1))], meta="average", n_splits=3,
                                progress=False, verbose=0)
    return stack.fit(frame, frame["label"].to_numpy(dtype=object))


def first_row_of_each_class(raw):
    return [int(raw.index[raw["label"] == label][0]) for label in sorted(raw["label"].unique())]


def swap_labels(raw, rows):
    """Give each of ``rows`` the label of the next class (a known set of wrong labels)."""
    labels = sorted(raw["label"].unique())
    raw = raw.copy()
    for row in rows:
        raw.loc[row, "label"] = labels[(labels.index(raw.loc[row, "label"]) + 1) % len(labels)]
    return raw


def test_swapped_labels_are_found_first(tmp_path):
    raw = words_table([f"class {c}" for c in range(4)])
    swapped = first_row_of_each_class(raw)
    prepared = prepare_table(swap_labels(raw, swapped), TableSpec(text_columns=["text"], target="label",
                                                                   id_column="id"))
    issues, lines = write_label_issues(fit_stack(prepared.frame), prepared, tmp_path)

    flagged = issues.table["id"].tolist()
    assert set(raw.loc[swapped, "id"]) <= set(flagged)
    assert set(flagged[: len(swapped)]) == set(raw.loc[swapped, "id"])  # ranked above any other
    found = issues.table.set_index("id").loc[raw.loc[swapped, "id"]]
    assert found["suggested_label"].tolist() == raw.loc[swapped, "label"].tolist()  # the true labels back
    assert (found["score"] == found["suggested_probability"] - found["given_probability"]).all()
    assert issues.table["score"].is_monotonic_decreasing
    assert lines[0] == "## Suspected label errors" and f"of {len(raw)} training products" in lines[2]


def test_a_clean_table_yields_few_issues(tmp_path):
    raw = words_table([f"class {c}" for c in range(4)])
    prepared = prepare_table(raw, TableSpec(text_columns=["text"], target="label", id_column="id"))
    issues, _ = write_label_issues(fit_stack(prepared.frame), prepared, tmp_path)
    assert len(issues.table) <= 1
    assert read_label_issues(tmp_path / LABEL_ISSUES).columns.tolist() == list(LABEL_ISSUE_COLUMNS)


def test_ids_and_labels_round_trip_exactly(tmp_path):
    raw = words_table(AWKWARD_LABELS, n_per_class=10)
    raw["id"] = [f"id, {i}\n\"é\"" if i % 2 else f"00{i}" for i in range(len(raw))]
    raw = swap_labels(raw, first_row_of_each_class(raw))
    prepared = prepare_table(raw, TableSpec(text_columns=["text"], target="label", id_column="id"))
    issues, _ = write_label_issues(fit_stack(prepared.frame), prepared, tmp_path)
    assert len(issues.table) >= len(AWKWARD_LABELS)

    back = read_label_issues(tmp_path / LABEL_ISSUES)
    pd.testing.assert_frame_equal(back, issues.table)
    labels = set(prepared.frame["label"])  # as the table gives them (" caps " is read as "caps")
    assert set(back["given_label"]) == set(back["suggested_label"]) == labels
    assert set(back["id"]) <= set(raw["id"])
    assert any("\n" in i for i in back["id"]) and any(i.startswith("00") for i in back["id"])


def test_a_file_that_is_not_a_label_issues_file_is_refused_by_name(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("id,label\n1,x\n")
    with pytest.raises(ValueError, match=r"other.csv: not a label issues file.*given_label"):
        read_label_issues(path)


def test_the_cut_is_confident_learning():
    proba = np.array([[0.90, 0.10, 0.00],   # class 0, sure
                      [0.70, 0.30, 0.00],   # class 0
                      [0.20, 0.80, 0.00],   # class 1
                      [0.30, 0.60, 0.10],   # class 1
                      [0.85, 0.15, 0.00],   # labelled 1, confidently 0: flagged
                      [0.45, 0.40, 0.15],   # labelled 1, under its threshold, likeliest 0 but under 0's: kept
                      [0.05, 0.05, 0.90]])  # class 2
    y = np.array([0, 0, 1, 1, 1, 1, 2])
    thresholds = confident_thresholds(proba, y)
    assert thresholds.round(4).tolist() == [0.8, round((0.8 + 0.6 + 0.15 + 0.4) / 4, 4), 0.9]
    ranking = rank_label_issues(proba, y)
    assert ranking.loc[ranking["flagged"], "row"].tolist() == [4]
    assert ranking["row"].tolist()[:2] == [4, 5]  # ranked by p(suggested) - p(given)
    assert ranking.set_index("row").loc[4, ["given", "suggested"]].tolist() == [1, 0]


def test_top_k_probabilities_rank_like_dense_ones():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 40, 300)
    proba = 0.1 * rng.dirichlet(np.full(40, 0.1), size=300)
    proba[np.arange(300), y] += 0.9
    y[:15] = (y[:15] + 1) % 40  # wrong labels
    dense = rank_label_issues(proba, y)
    sparse = rank_label_issues(top_k_rows(proba, 40), y)
    pd.testing.assert_frame_equal(dense.astype(float), sparse.astype(float), atol=1e-6)
    cut = rank_label_issues(top_k_rows(proba, 5), y)
    assert set(cut["row"][:15]) == set(dense["row"][:15]) == set(range(15))  # the wrong labels first
    flagged = set(dense.loc[dense["flagged"], "row"])
    assert set(cut.loc[cut["flagged"], "row"]) == flagged and 0 < len(flagged) <= 15


def test_bad_labels_are_refused_before_any_work():
    with pytest.raises(ValueError, match="3 labels for 2 rows"):
        rank_label_issues(np.full((2, 2), 0.5), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"column indices in \[0, 2\)"):
        rank_label_issues(np.full((2, 2), 0.5), np.array([0, 2]))


@pytest.mark.slow  # the report's plots
def test_the_run_report_lists_them_with_text_and_thumbnail(tmp_path):
    raw = words_table([f"class {c}" for c in range(3)], n_per_class=12)
    raw["image"] = None
    swapped = [2, 9]
    for row in swapped:
        raw.loc[row, "image"] = str(write_image(tmp_path / "images" / f"{row}.png"))
    raw.loc[swapped[0] + 1, "image"] = str(tmp_path / "images" / "missing.jpg")
    prepared = prepare_table(swap_labels(raw, swapped), SPEC)
    stack = fit_stack(prepared.frame)
    text = write_run_report(stack, prepared, tmp_path / "run").path.read_text()

    assert "## Suspected label errors" in text and "## Look-alike categories" in text
    assert f"[{LABEL_ISSUES}]({LABEL_ISSUES})" in text
    assert f"![]({THUMBNAILS}/1.jpg)" in text and raw.loc[swapped[0], "text"] in text
    assert (tmp_path / "run" / THUMBNAILS / "1.jpg").stat().st_size > 0
    assert (tmp_path / "run" / "lookalike_categories.csv").exists()


def test_the_catalogue_sections_cost_no_plot_and_name_their_source(tmp_path):
    raw = words_table([f"class {c}" for c in range(3)], n_per_class=12)
    prepared = prepare_table(swap_labels(raw, first_row_of_each_class(raw)), TableSpec(
        text_columns=["text"], target="label", id_column="id"))
    lines = catalogue_sections(fit_stack(prepared.frame), prepared, tmp_path)
    assert "## Suspected label errors" in lines and "## Look-alike categories" in lines
    assert "meta:AverageBlend" in "\n".join(lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["label_issues.csv", "lookalike_categories.csv"]


def test_a_table_of_another_length_is_refused(tmp_path):
    raw = words_table([f"class {c}" for c in range(3)], n_per_class=12)
    spec = TableSpec(text_columns=["text"], target="label", id_column="id")
    stack = fit_stack(prepare_table(raw, spec).frame)
    with pytest.raises(ValueError, match="the table has 30 rows but the stack was fitted on 36"):
        write_label_issues(stack, prepare_table(raw.head(30), spec), tmp_path)
    assert not (tmp_path / LABEL_ISSUES).exists()
