from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score

from stackcat.metrics import (
    comparison_table,
    confused_pairs,
    per_class_report,
    score,
    y_as_indices,
)
from stackcat.report import PLOTS, markdown_table, write_report


def two_class_rows(confidence, correct):
    """Rows [c, 1 - c] predicting class 0; the true class is 0 where ``correct``."""
    confidence = np.asarray(confidence, dtype=np.float64)
    proba = np.column_stack([confidence, 1 - confidence])
    return np.where(correct, 0, 1), proba


def test_coverage_at_precision_hand_made():
    # 100 products, confidence 0.999 down to 0.900; errors at sorted positions 60, 80-84 (1-based).
    confidence = 1 - np.arange(1, 101) / 1000
    correct = np.ones(100, dtype=bool)
    correct[[59, 79, 80, 81, 82, 83]] = False
    y, proba = two_class_rows(confidence, correct)
    order = np.random.default_rng(0).permutation(100)  # the input order must not matter
    result = score(y[order], proba[order])
    # 99%: the first error (position 60) already drops precision to 59/60 < 0.99.
    assert result["coverage_at_99"] == pytest.approx(0.59)
    assert result["threshold_at_99"] == pytest.approx(0.941)
    # 95%: 78/82 = 0.951 still passes, 78/83 = 0.940 does not, nor does 94/100 later.
    assert result["coverage_at_95"] == pytest.approx(0.82)
    assert result["threshold_at_95"] == pytest.approx(0.918)
    assert result["accuracy"] == pytest.approx(0.94)


def test_coverage_accepts_ties_together_and_can_be_zero():
    y, proba = two_class_rows([0.9, 0.9, 0.9, 0.8], [True, True, False, True])
    result = score(y, proba)
    assert result["coverage_at_95"] == 0.0 and result["threshold_at_95"] == float("inf")
    y, proba = two_class_rows([0.9, 0.9, 0.7], [True, True, False])
    assert score(y, proba)["coverage_at_99"] == pytest.approx(2 / 3)


def test_top5_counts_ties_against_the_true_class():
    base = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.01, 0.01])
    proba = np.tile(base, (3, 1))
    y = np.array([4, 5, 8])  # 5th (hit), 6th (miss), tied with class 9 at the bottom (miss)
    assert score(y, proba)["top5_accuracy"] == pytest.approx(1 / 3)
    tied = np.array([[0.3, 0.2, 0.15, 0.1, 0.1, 0.1, 0.05, 0.0, 0.0, 0.0]])
    assert score([4], tied)["top5_accuracy"] == 0.0  # three classes share 0.1: rank 5 at best


def test_top5_matches_sklearn_without_ties():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(12), size=300)
    y = rng.integers(0, 12, 300)
    assert score(y, proba)["top5_accuracy"] == pytest.approx(top_k_accuracy_score(y, proba, k=5, labels=range(12)))


def test_ece_of_a_perfectly_calibrated_and_an_overconfident_toy():
    calibrated = [0.7] * 10 + [0.9] * 10
    correct = [True] * 7 + [False] * 3 + [True] * 9 + [False]
    y, proba = two_class_rows(calibrated, correct)
    assert score(y, proba)["ece"] == pytest.approx(0.0, abs=1e-12)
    y, proba = two_class_rows([0.9] * 10, [True] * 5 + [False] * 5)
    assert score(y, proba)["ece"] == pytest.approx(0.4)
    # two bins: |0.6 - 1.0| on 4 rows, |0.95 - 0.5| on 4 rows -> (0.4 + 0.45) / 2
    y, proba = two_class_rows([0.6] * 4 + [0.95] * 4, [True] * 4 + [True, True, False, False])
    assert score(y, proba)["ece"] == pytest.approx(0.425)


def test_f1_scores_match_sklearn():
    rng = np.random.default_rng(1)
    proba = rng.dirichlet(np.ones(9) * 0.3, size=400)
    proba[:, 8] = 0  # class 8: never true, never predicted
    y = rng.integers(0, 8, 400)
    y[:40] = proba[:40].argmax(1)
    pred = proba.argmax(1)
    result = score(y, proba)
    assert result["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert result["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert result["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert result["n_samples"] == 400


def test_labels_through_classes():
    proba = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    by_label = score(["shoe", "bag", "bag"], proba, classes=["shoe", "bag", "hat"])
    assert by_label == score([0, 1, 1], proba)
    with pytest.raises(ValueError, match="'cap'"):
        score(["shoe", "cap", "bag"], proba, classes=["shoe", "bag", "hat"])
    with pytest.raises(TypeError, match="classes="):
        score(["shoe", "bag", "bag"], proba)
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        score([0, 1, 3], proba)


def test_per_class_report_by_hand():
    proba = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.2, 0.8, 0.0]])
    table = per_class_report(["a", "a", "b", "a"], proba, ["a", "b", "c"], train_counts={"a": 30, "b": 4})
    assert table["class"].tolist() == ["a", "b", "c"]
    a, b, c = (table.iloc[i] for i in range(3))
    assert (a["support"], a["predicted"], a["precision"], a["recall"]) == (3, 2, 1.0, pytest.approx(2 / 3))
    assert a["f1"] == pytest.approx(0.8)
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert (c["support"], c["f1"], c["train_count"]) == (0, 0.0, 0)
    assert a["train_count"] == 30
    same = per_class_report([0, 0, 1, 0], proba, ["a", "b", "c"], train_counts=[30, 4, 0])
    pd.testing.assert_frame_equal(same, table)


def test_confused_pairs_counts_errors_only():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([1, 1, 0, 0, 1, 1, 0, 1])
    pairs = confused_pairs(y, pred, 3, top=2)
    assert pairs.values.tolist() == [[0, 1, 2], [2, 1, 2]]
    assert len(confused_pairs(y, y, 3)) == 0


def test_comparison_table_and_markdown():
    y = np.array([0, 1, 1])
    results = {"text": np.eye(2)[[0, 1, 1]], "image|cnn": np.eye(2)[[1, 1, 1]]}
    table = comparison_table(results, y)
    assert table.index.tolist() == ["text", "image|cnn"]
    assert table.loc["text", "accuracy"] == 1.0
    assert {"weighted_f1", "macro_f1", "top5_accuracy", "ece", "coverage_at_95", "threshold_at_99"} <= set(table)
    text = markdown_table(table[["accuracy"]])
    assert text.splitlines() == ["| model | accuracy |", "|---|---|", "| text | 1.0000 |", "| image\\|cnn | 0.6667 |"]


@pytest.fixture
def report_inputs():
    rng = np.random.default_rng(4)
    classes = [f"category {i}" for i in range(12)]
    counts = np.array([400, 200, 120, 80, 60, 40, 20, 10, 5, 3, 2, 1])
    y = rng.choice(12, size=600, p=counts / counts.sum())
    results = {}
    for name, noise in [("fasttext", 1.0), ("bert", 0.8), ("clip", 2.0)]:
        logits = 2.5 * np.eye(12)[y] + noise * rng.normal(size=(600, 12))
        results[name] = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    results["average"] = sum(results.values()) / 3
    sharper = results["average"] ** 2
    results["rerank"] = sharper / sharper.sum(1, keepdims=True)
    return results, y, classes, counts


def test_write_report_writes_every_file(tmp_path, report_inputs):
    results, y, classes, counts = report_inputs
    labels = [classes[i] for i in y]
    path = write_report(tmp_path / "run", results, labels, classes, train_counts=counts,
                        title="Demo run", notes=["5-fold OOF", "seed 0"])
    run = tmp_path / "run"
    assert path == run / "report.md"
    text = path.read_text(encoding="utf-8")
    for png in PLOTS.values():
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text
    for name in results:
        assert f"| {name} |" in text
    assert "# Demo run" in text and "- 5-fold OOF" in text
    assert "Headline model: **rerank**" in text
    assert "vs the best single model (bert)" in text and "vs the average blend (average)" in text
    per_class = pd.read_csv(run / "per_class_f1.csv")
    assert len(per_class) == 12
    assert {f"f1[{name}]" for name in results} <= set(per_class.columns)
    assert per_class.set_index("class").loc["category 0", "train_count"] == 400
    assert sorted(p.name for p in run.iterdir()) == sorted([*PLOTS.values(), "report.md", "per_class_f1.csv"])


def test_write_report_per_class_f1_matches_sklearn(tmp_path, report_inputs):
    results, y, classes, _ = report_inputs
    write_report(tmp_path, results, y, classes, headline="bert")
    per_class = pd.read_csv(tmp_path / "per_class_f1.csv").set_index("class")
    expected = f1_score(y, results["clip"].argmax(1), average=None, labels=range(12), zero_division=0)
    np.testing.assert_allclose(per_class.loc[classes, "f1[clip]"], expected)
    assert "Headline model: **bert**" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_write_report_rejects_unknown_headline(tmp_path, report_inputs):
    results, y, classes, _ = report_inputs
    with pytest.raises(ValueError, match="headline 'meta'"):
        write_report(tmp_path, results, y, classes, headline="meta")


@pytest.mark.slow
def test_integer_classes_with_indices_need_y_kind(tmp_path):
    # classes {0, 2, 3}: y=[0, 2] reads as labels (rows of class 0 and 2) or as indices (class 0 and 3)
    classes = [0, 2, 3]
    proba = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    with pytest.raises(ValueError, match="y_kind"):
        y_as_indices([0, 2], classes)
    assert y_as_indices([0, 2], classes, y_kind="indices").tolist() == [0, 2]
    assert y_as_indices([0, 2], classes, y_kind="labels").tolist() == [0, 1]
    with pytest.raises(ValueError, match="y_kind"):
        write_report(tmp_path, {"m": proba}, [0, 2], classes)
    write_report(tmp_path, {"m": proba}, [0, 2], classes, y_kind="indices")
    per_class = pd.read_csv(tmp_path / "per_class_f1.csv").set_index("class")
    assert per_class.loc[3, "support"] == 1 and per_class.loc[2, "support"] == 0
    assert per_class["f1[m]"].loc[[0, 3]].tolist() == [1.0, 1.0]
    write_report(tmp_path, {"m": proba}, [0, 2], classes, y_kind="labels")
    per_class = pd.read_csv(tmp_path / "per_class_f1.csv").set_index("class")
    assert per_class.loc[2, "support"] == 1 and per_class.loc[3, "support"] == 0


def test_unambiguous_targets_need_no_y_kind():
    assert y_as_indices(["b", "a"], ["a", "b"]).tolist() == [1, 0]
    assert y_as_indices([1, 0], ["a", "b"]).tolist() == [1, 0]
    assert y_as_indices([0, 1, 2], [0, 1, 2]).tolist() == [0, 1, 2]  # both readings agree
    with pytest.raises(ValueError, match="y_kind must be"):
        y_as_indices([0], ["a"], y_kind="label")

