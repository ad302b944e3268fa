from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from stackcat.models.fasttext import AUTO_EPOCH_TOKENS, FastTextClassifier, auto_epochs, auto_lr

from contract import check_fitted_contract, check_sklearn_contract

TEXTS = ["red cotton shirt", "blue denim jeans", "leather wallet brown", "running shoes light"]


def small_data(labels):
    texts = [f"{t} {i}" for i in range(8) for t in TEXTS]
    y = [labels[j] for _ in range(8) for j in range(4)]
    return texts, y


def test_sklearn_checks_that_apply():
    check_sklearn_contract(FastTextClassifier())


@pytest.mark.parametrize("labels", [
    ["a shirt", "jeans & co", "wallet", "shoes"],   # strings with spaces
    [10, 20, 30, 40],                              # ints
])
def test_contract_any_label_type(labels):
    X, y = small_data(labels)
    clf = FastTextClassifier(epoch=30, n_threads=1, dim=16)
    check_fitted_contract(clf, X, y, ["cotton shirt", "denim", "new\nline text", ""])
    assert clf.predict(["red cotton shirt"])[0] == labels[0]


def test_reads_named_columns_of_a_dataframe():
    X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    frame = pd.DataFrame({"desc": X, "name": [t.split()[0] for t in X]})
    clf = FastTextClassifier(text_column="desc", title_column="name", epoch=30, n_threads=1, dim=16)
    proba = clf.fit(frame, y).predict_proba(frame)
    assert (clf.classes_[proba.argmax(1)] == np.array(y)).mean() > 0.9


def test_missing_column_is_named():
    clf = FastTextClassifier(text_column="body")
    with pytest.raises(KeyError, match="'body'"):
        clf.fit(pd.DataFrame({"text": ["a"]}), ["x"])


def test_title_upweighting_reaches_fasttext():
    clf = FastTextClassifier(title_words=2, title_repeat=3, normalize=False)
    frame = pd.DataFrame({"text": ["Shop: Red shirt men"], "title": ["Red shirt men"]})
    assert clf._texts(frame) == ["Red shirt Red shirt Red shirt Shop: Red shirt men"]
    assert FastTextClassifier(title_repeat=0, normalize=False)._texts(frame) == ["Shop: Red shirt men"]


def test_auto_upweighting_only_where_the_title_is_drowned():
    clf = FastTextClassifier(title_words=2)
    long_card = "Shop: Red shirt. " + "soft cotton fabric, long sleeves " * 3
    frame = pd.DataFrame({"text": [long_card, "Red shirt. colour: red"], "title": ["Red shirt", "Red shirt"]})
    upweighted, short = clf._texts(frame)
    assert upweighted.startswith("red shirt red shirt shop red shirt soft cotton")
    assert short == "red shirt colour red"


def test_normalize_lowercases_and_splits_punctuation():
    clf = FastTextClassifier(title_repeat=0)
    assert clf._texts(["Blue,Jeans.\nMen's  (slim)"]) == ["blue jeans men s slim"]


def test_invalid_param_rejected_at_fit_not_init():
    clf = FastTextClassifier(loss="nope")
    with pytest.raises(ValueError, match="loss"):
        clf.fit(["a b"], ["x"])


def test_single_thread_is_repeatable():
    X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    clf = FastTextClassifier(epoch=5, n_threads=1, random_state=3)
    a = clone(clf).fit(X, y).predict_proba(X)
    b = clone(clf).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)


def test_train_file_removed_even_when_training_fails(monkeypatch):
    import fasttext

    def boom(**kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(fasttext, "train_supervised", boom)
    before = {f for f in os.listdir(tempfile.gettempdir()) if f.startswith("stackcat-fasttext-")}
    with pytest.raises(RuntimeError, match="simulated"):
        FastTextClassifier().fit(["a b", "c d"], ["x", "y"])
    after = {f for f in os.listdir(tempfile.gettempdir()) if f.startswith("stackcat-fasttext-")}
    assert after == before


def test_divergence_halves_the_learning_rate(monkeypatch):
    import fasttext

    real_train = fasttext.train_supervised
    seen = []

    def diverge_at_high_lr(**options):
        seen.append(options["lr"])
        if options["lr"] > 0.2:
            raise RuntimeError("Encountered NaN.")
        return real_train(**options)

    monkeypatch.setattr(fasttext, "train_supervised", diverge_at_high_lr)
    X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    with pytest.warns(UserWarning, match="diverged with lr=0.5"):
        clf = FastTextClassifier(lr=0.5, epoch=5, n_threads=1).fit(X, y)
    assert seen == [0.5, 0.25, 0.125] and clf.lr_ == 0.125


def test_every_halving_diverged_names_what_to_do(monkeypatch):
    import fasttext

    def always_nan(**options):
        raise RuntimeError("Encountered NaN.")

    monkeypatch.setattr(fasttext, "train_supervised", always_nan)
    X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    with pytest.warns(UserWarning, match="diverged"), \
            pytest.raises(RuntimeError, match=r"every learning rate from 0.5 down to 0.03125: give a lower lr"):
        FastTextClassifier(lr=0.5, epoch=5, n_threads=1).fit(X, y)


def record_train_options(monkeypatch) -> dict:
    import fasttext

    real_train = fasttext.train_supervised
    seen: dict = {}

    def record(**options):
        seen.update(options)
        return real_train(**{**options, "epoch": 1})

    monkeypatch.setattr(fasttext, "train_supervised", record)
    return seen


def test_n_threads_reaches_fasttext_and_minus_one_means_every_core(monkeypatch):
    seen = record_train_options(monkeypatch)
    X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    FastTextClassifier(n_threads=2).fit(X, y)
    assert seen["thread"] == 2
    for every_core in (None, -1):
        FastTextClassifier(n_threads=every_core).fit(X, y)
        assert seen["thread"] == (os.cpu_count() or 1)


# A large block freed on the heap, full of 0x7f bytes (floats of 3.4e38), as a long-lived
# process leaves behind: fastText's input matrix used to reuse it (it initializes only a tenth
# of its rows with one thread) and diverged at every learning rate ("Encountered NaN").
DIRTY_HEAP_FIT = """
import ctypes, sys
sys.path.insert(0, {tests!r})
import numpy as np
from stackcat.models.fasttext import FastTextClassifier
from test_fasttext import small_data

X, y = small_data(["a shirt", "jeans & co", "wallet", "shoes"])
model = FastTextClassifier(epoch=30, n_threads=1, dim=16)
clean = model.fit(X, y).predict_proba(X)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
assert libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD at its maximum: 20 MB blocks come from the heap
block = libc.malloc(20 << 20)
ctypes.memset(block, 0x7F, 20 << 20)
libc.malloc(20 << 20)  # cut from the heap's top after the block: it keeps the block from merging back
libc.free(block)
np.testing.assert_array_equal(model.fit(X, y).predict_proba(X), clean)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the dirty heap is built with glibc's mallopt")
def test_a_dirty_heap_changes_nothing():
    script = DIRTY_HEAP_FIT.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_repeated_fits_in_one_process_are_identical():
    # before the malloc fix, the 5th+ fit of a tiny model in one process drifted
    X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    probas = [FastTextClassifier(n_threads=1, dim=16).fit(X, y).predict_proba(X) for _ in range(8)]
    for proba in probas[1:]:
        np.testing.assert_array_equal(proba, probas[0])


def test_auto_epochs_bounded_by_tokens_only_above_the_floor():
    assert auto_epochs(1_000) == 150 and auto_epochs(100_000) == 25
    # short texts: the row rule alone
    assert auto_epochs(1_000, n_tokens=10_000) == 150
    # long texts: all passes together stay within the token budget ...
    epochs = auto_epochs(1_000, n_tokens=200_000)
    assert epochs < 150 and epochs * 200_000 <= AUTO_EPOCH_TOKENS + 200_000
    # ... but never below 25 passes, and large tables keep their 25 whatever their text weighs
    assert auto_epochs(1_000, n_tokens=5_000_000) == 25
    assert auto_epochs(40_000, n_tokens=40_000_000) == 25


def test_auto_lr_makes_up_for_the_passes_cut():
    assert auto_lr(0.5, 1_000, 150) == 0.5
    assert auto_lr(0.5, 1_000, 75) == pytest.approx(1.0)
    assert auto_lr(0.5, 1_000, 25) == pytest.approx(2.0)  # capped at 4x
    assert auto_lr(0.5, 40_000, 25) == 0.5


def test_long_texts_train_fewer_passes_at_a_higher_lr(monkeypatch):
    import fasttext

    real_train = fasttext.train_supervised
    seen = {}

    def record(**options):
        seen.update(options)
        return real_train(**{**options, "epoch": 1})  # the passes asked for are what matters

    monkeypatch.setattr(fasttext, "train_supervised", record)
    short_X, y = small_data(["shirt", "jeans", "wallet", "shoes"])
    FastTextClassifier(n_threads=1, title_repeat=0).fit(short_X, y)
    assert (seen["epoch"], seen["lr"]) == (150, 0.5)

    words_per_text = 4_000  # 32 rows x 4,000 words: 128k tokens
    long_X = [" ".join([text] * (words_per_text // len(text.split()))) for text in short_X]
    clf = FastTextClassifier(n_threads=1, title_repeat=0).fit(long_X, y)
    n_tokens = sum(len(text.split()) for text in long_X)
    assert clf.epoch_ == seen["epoch"] == -(-AUTO_EPOCH_TOKENS // n_tokens) < 150
    assert clf.lr_ == seen["lr"] == pytest.approx(0.5 * 150 / clf.epoch_)
    # an explicit epoch is used as given
    FastTextClassifier(n_threads=1, title_repeat=0, epoch=7).fit(long_X, y)
    assert (seen["epoch"], seen["lr"]) == (7, 0.5)
