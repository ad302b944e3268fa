"""FastTextClassifier: supervised fastText as a scikit-learn classifier."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import Interval, Options, StrOptions
from sklearn.utils.validation import check_is_fitted

from stackcat.data import upweight_title
from stackcat.models._base import (
    ProbaClassifierMixin,
    as_texts,
    column_values,
    encode_labels,
    normalize_rows,
    optional_column,
)
from stackcat.runs import scratch_dir

_LABEL_PREFIX = "__label__"
_NON_WORD = re.compile(r"[^\w]+")
AUTO_EPOCH_UPDATES = 150_000
# Tokens fastText goes through in all epochs ("auto"): what a fit costs. 25 epochs of the
# 44,446 Myntra products (35,557 training rows x 14 words) are 12.6M.
AUTO_EPOCH_TOKENS = 10_000_000
MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS = 25, 150
MAX_AUTO_LR_SCALE = 4.0
MAX_LR_HALVINGS = 4
_M_PERTURB = -6  # glibc's mallopt parameter number


def auto_epochs(n_samples: int, n_tokens: int | None = None) -> int:
    """Passes over the data for ``epoch="auto"``: more for few rows, fewer for long texts.

    fastText's linearly decaying lr needs enough updates, so small data sets get
    more passes: ``clip(ceil(150_000 / n_samples), 25, 150)``. Those extra passes
    (above 25) are bounded by the text: all passes together go through at most
    :data:`AUTO_EPOCH_TOKENS` tokens, so a small table of long descriptions costs
    what its text weighs, not 150 passes. Never fewer than 25 passes.

    Parameters
    ----------
    n_samples : int
        Training rows.
    n_tokens : int or None, default=None
        Words in all training texts (as fastText sees them); None: rows only.

    Examples
    --------
    >>> auto_epochs(1_000), auto_epochs(1_000, n_tokens=20_000), auto_epochs(1_000, n_tokens=250_000)
    (150, 150, 40)
    >>> auto_epochs(40_000, n_tokens=10_000_000)
    25
    """
    by_rows = int(np.clip(math.ceil(AUTO_EPOCH_UPDATES / max(n_samples, 1)), MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS))
    if n_tokens is None:
        return by_rows
    by_tokens = math.ceil(AUTO_EPOCH_TOKENS / max(n_tokens, 1))
    return max(MIN_AUTO_EPOCHS, min(by_rows, by_tokens))


def auto_lr(lr: float, n_samples: int, epochs: int) -> float:
    """The learning rate for ``epochs`` auto passes: ``lr`` raised as far as the passes were cut.

    With fewer passes than the row rule asks for (see :func:`auto_epochs`), the lr
    goes up by the same factor (at most :data:`MAX_AUTO_LR_SCALE`), so the sum of
    the decaying steps stays the same. Measured on a 1,000-row table of ~270-word
    texts (experiments/results/encoders.md): 150 passes at lr 0.5 and 40 at lr 1.9
    give the same F1; 40 at lr 0.5 lose 7 points.

    Examples
    --------
    >>> auto_lr(0.5, 1_000, 150), auto_lr(0.5, 1_000, 50), auto_lr(0.5, 40_000, 25)
    (0.5, 1.5, 0.5)
    """
    by_rows = auto_epochs(n_samples)
    return lr * min(max(by_rows / epochs, 1.0), MAX_AUTO_LR_SCALE)


def _one_line(text: str) -> str:
    # fastText reads one example per line and rejects newlines at predict time.
    return " ".join(text.split())


class FastTextClassifier(ProbaClassifierMixin, ClassifierMixin, BaseEstimator):
    """Supervised fastText on the product text, with the title's first words up-weighted.

    Parameters
    ----------
    text_column : str, default="text"
        Column of X holding the text (X may also be a plain list of strings).
    title_column : str or None, default="title"
        Column holding the title; its first ``title_words`` words are repeated
        ``title_repeat`` times before the text (from the text itself when the
        column is absent).
    title_words : int, default=3
    title_repeat : int or "auto", default="auto"
        0 turns the up-weighting off. ``"auto"`` repeats twice where the title
        is under a third of the text's words (long descriptions drown the
        title, as in marketplace cards) and not at all where the text is
        mostly title (measured on Myntra: repeating there costs 0.4 points of
        weighted F1).
    epoch : int or "auto", default="auto"
        Passes over the data. ``"auto"`` gives small data sets more passes:
        ``clip(ceil(150_000 / n_samples), 25, 150)`` (25 from ~6,000 rows up),
        but no more passes above 25 than 10M tokens in all allow (long texts),
        with ``lr`` raised to make up for the passes cut (see :func:`auto_epochs`,
        :func:`auto_lr`); the values used are ``epoch_`` and ``lr_``.
    lr, wordNgrams, dim, minn, maxn, minCount, loss :
        fastText's own training parameters, same names and meaning. ``loss``
        stays ``"softmax"`` at any class count: on Myntra, hierarchical softmax
        (``"hs"``) made 15% more errors at 136 classes and 5.6 times as many at
        855 (label-crossed), for 1.4x / 4.6x less CPU; ``"ova"`` was level at
        136 classes and slower (experiments/RESULTS.md, "Fit time at scale").
    bucket : int, default=200_000
        Hash buckets of word/char n-grams. fastText's own default (2M) makes
        each model 800 MB (5 fold models: 4 GB per run); 200k gave the same
        F1 on Myntra (see experiments/RESULTS.md) at 80 MB.
    pretrained_vectors : str or None
        Path of a ``.vec`` file of word vectors (its dimension must equal ``dim``).
    normalize : bool, default=True
        Lower-case and turn punctuation into spaces (fastText splits on spaces
        only, so "Blue," and "blue" would be different words).
    n_threads : int or None, default=None
        fastText threads; None or -1 uses every core. Training is exactly
        repeatable only with ``n_threads=1`` (fastText's Hogwild updates race
        otherwise); see docs/reliability.md.
    random_state : int, default=0
        fastText's seed.
    verbose : int, default=0

    Attributes
    ----------
    classes_ : ndarray
        The labels, sorted; columns of ``predict_proba`` follow this order.
    epoch_ : int
        The number of epochs trained.
    lr_ : float
        The learning rate used: ``lr`` (raised by :func:`auto_lr` when ``epoch="auto"``
        cut the passes for long texts), halved (with a warning) each time
        fastText diverged (its "Encountered NaN" error), at most 4 times.
    model_ : fasttext.FastText._FastText
        The trained model (pickled as its binary bytes).

    Examples
    --------
    >>> clf = FastTextClassifier(epoch=10, n_threads=1)
    >>> clf = clf.fit(["red cotton shirt", "blue denim jeans"] * 5, ["shirt", "jeans"] * 5)
    >>> clf.predict(["cotton shirt"]).tolist()
    ['shirt']
    """

    # params that change how fast, not what, it learns: left out of the run folder's job keys
    # (`n_threads` is not one: FastText's lock-free threads change the result)
    _runtime_params = ("verbose",)
    # read when the input has it (the title words are up-weighted), not required
    optional_columns = ("title_column",)

    _parameter_constraints: dict = {
        "text_column": [str],
        "title_column": [str, None],
        "title_words": [Interval(Integral, 0, None, closed="left")],
        "title_repeat": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
        "epoch": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "wordNgrams": [Interval(Integral, 1, None, closed="left")],
        "dim": [Interval(Integral, 1, None, closed="left")],
        "minn": [Interval(Integral, 0, None, closed="left")],
        "maxn": [Interval(Integral, 0, None, closed="left")],
        "minCount": [Interval(Integral, 1, None, closed="left")],
        "bucket": [Interval(Integral, 0, None, closed="left")],
        "loss": [StrOptions({"softmax", "ns", "hs", "ova"})],
        "pretrained_vectors": [str, os.PathLike, None],
        "normalize": ["boolean"],
        "n_threads": [Interval(Integral, 1, None, closed="left"), Options(Integral, {-1}), None],
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "verbose": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(
        self,
        text_column: str = "text",
        title_column: str | None = "title",
        title_words: int = 3,
        title_repeat: int | str = "auto",
        epoch: int | str = "auto",
        lr: float = 0.5,
        wordNgrams: int = 2,
        dim: int = 100,
        minn: int = 2,
        maxn: int = 5,
        minCount: int = 1,
        bucket: int = 200_000,
        loss: str = "softmax",
        pretrained_vectors: str | None = None,
        normalize: bool = True,
        n_threads: int | None = None,
        random_state: int = 0,
        verbose: int = 0,
    ) -> None:
        self.text_column = text_column
        self.title_column = title_column
        self.title_words = title_words
        self.title_repeat = title_repeat
        self.epoch = epoch
        self.lr = lr
        self.wordNgrams = wordNgrams
        self.dim = dim
        self.minn = minn
        self.maxn = maxn
        self.minCount = minCount
        self.bucket = bucket
        self.loss = loss
        self.pretrained_vectors = pretrained_vectors
        self.normalize = normalize
        self.n_threads = n_threads
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> FastTextClassifier:
        """Train on texts ``X`` (DataFrame or list of strings) and labels ``y``."""
        if self.bucket == 0 and (self.wordNgrams > 1 or self.maxn > 0):
            raise ValueError(
                f"bucket=0 needs wordNgrams=1 and maxn=0 (got wordNgrams={self.wordNgrams}, "
                f"maxn={self.maxn}): fastText hashes word and character n-grams into the buckets"
            )
        texts = self._texts(X)
        self.classes_, y_index = encode_labels(y, len(texts))
        self.epoch_, lr = self._epochs_and_lr(texts)
        path = self._write_train_file(texts, y_index)
        try:
            self.model_, self.lr_ = _train_halving_lr_on_nan(path, {**self._train_options(), "lr": lr})
        finally:
            os.unlink(path)
        return self

    def _epochs_and_lr(self, texts: list[str]) -> tuple[int, float]:
        if self.epoch != "auto":
            return self.epoch, self.lr
        epochs = auto_epochs(len(texts), n_tokens=sum(len(text.split()) for text in texts))
        return epochs, auto_lr(self.lr, len(texts), epochs)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities ``(n_samples, n_classes)`` in ``classes_`` order; rows sum to 1."""
        check_is_fitted(self, "model_")
        texts = self._texts(X)
        proba = np.zeros((len(texts), len(self.classes_)), dtype=np.float64)
        if not texts:
            return proba
        labels, scores = self.model_.predict(texts, k=-1, threshold=0.0)
        for row, (row_labels, row_scores) in enumerate(zip(labels, scores)):
            columns = [int(label[len(_LABEL_PREFIX):]) for label in row_labels]
            proba[row, columns] = row_scores
        return normalize_rows(proba)

    def _texts(self, X: Any) -> list[str]:
        texts = as_texts(column_values(X, self.text_column, what="text"))
        title_values = optional_column(X, self.title_column)
        titles = as_texts(title_values) if title_values is not None else [None] * len(texts)
        out = [upweight_title(t, h or None, self.title_words, self._repeats(t, h))
               for t, h in zip(texts, titles)]
        return [_NON_WORD.sub(" ", t).lower().strip() for t in out] if self.normalize else [_one_line(t) for t in out]

    def _repeats(self, text: str, title: str | None) -> int:
        if self.title_repeat != "auto":
            return self.title_repeat
        title_words = len((title or "").split()) or self.title_words
        return 2 if 3 * title_words < len(text.split()) else 0

    @staticmethod
    def _write_train_file(texts: list[str], y_index: np.ndarray) -> str:
        # in the run folder when a stack runs this fit: a killed job's text is deleted at the next start
        handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt",
                                             prefix="stackcat-fasttext-", delete=False, dir=scratch_dir())
        try:
            with handle:
                for text, label in zip(texts, y_index):
                    handle.write(f"{_LABEL_PREFIX}{label} {text}\n")
        except BaseException:
            os.unlink(handle.name)
            raise
        return handle.name

    def _train_options(self) -> dict[str, Any]:
        options = dict(
            epoch=self.epoch_, lr=self.lr, wordNgrams=self.wordNgrams, dim=self.dim,
            minn=self.minn, maxn=self.maxn, minCount=self.minCount, bucket=self.bucket,
            loss=self.loss, thread=self._threads(),
            seed=self.random_state, verbose=self.verbose,
        )
        if self.pretrained_vectors:
            options["pretrainedVectors"] = str(self.pretrained_vectors)
        return options

    def _threads(self) -> int:
        threads = self.n_threads
        return threads if threads is not None and threads > 0 else os.cpu_count() or 1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if "model_" in state:
            state["model_"] = _model_bytes(state["model_"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("model_"), bytes):
            state["model_"] = _model_from_bytes(state["model_"])
        self.__dict__.update(state)

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc (its ``mallopt`` is called), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc has it, other C libraries may not
    except (OSError, AttributeError):
        return None
    return libc


_zeroing_lock = threading.Lock()
_zeroing_fits = 0


@contextlib.contextmanager
def _zeroed_heap_memory() -> Iterator[None]:
    """While fastText trains, glibc hands out zero-filled memory, as a fresh process does.

    fastText's random initialization of its input matrix (``DenseMatrix::uniform``)
    fills only ``min(thread, 10) / 10`` of the rows; the others keep whatever
    ``posix_memalign`` returned. A fresh ``mmap`` gives zeros, but in a process
    that has freed a large heap block (earlier fits, tokenizers, pandas...) the
    matrix reuses that dirty block: the model changes with what ran before, and
    garbage such as ``0x7f7f7f7f`` floats makes every learning rate diverge
    ("Encountered NaN"). glibc's ``M_PERTURB`` set to ``0xff`` zero-fills the
    blocks it hands out from its bins, large ones included (and fills freed
    blocks with ``0xff``): the matrix starts as in a fresh process. Fits on
    several threads share the setting; the last one to end puts back the
    process's own (``MALLOC_PERTURB_``, else off). No-op off glibc.
    """
    global _zeroing_fits
    libc = _glibc()
    if libc is None:
        yield
        return
    with _zeroing_lock:
        if _zeroing_fits == 0:
            libc.mallopt(_M_PERTURB, 0xFF)
        _zeroing_fits += 1
    try:
        yield
    finally:
        with _zeroing_lock:
            _zeroing_fits -= 1
            if _zeroing_fits == 0:
                libc.mallopt(_M_PERTURB, _process_perturb_byte())


def _process_perturb_byte() -> int:
    try:
        return int(os.environ.get("MALLOC_PERTURB_", "0")) & 0xFF
    except ValueError:
        return 0


def _train_halving_lr_on_nan(path: str, options: dict[str, Any]) -> tuple[Any, float]:
    import fasttext

    lr = options["lr"]
    for attempt in range(MAX_LR_HALVINGS + 1):
        try:
            with _zeroed_heap_memory():
                return fasttext.train_supervised(input=path, **{**options, "lr": lr}), lr
        except RuntimeError as exc:
            if "NaN" not in str(exc):
                raise
            if attempt == MAX_LR_HALVINGS:
                raise RuntimeError(
                    f"fastText diverged (Encountered NaN) at every learning rate from {options['lr']} "
                    f"down to {lr}: give a lower lr (FastTextClassifier(lr=...)) or fewer epochs"
                ) from exc
            warnings.warn(f"fastText diverged with lr={lr}; retrying with lr={lr / 2}", stacklevel=3)
            lr /= 2
    raise AssertionError("unreachable")


def _model_bytes(model: Any) -> bytes:
    fd, path = tempfile.mkstemp(suffix=".bin", prefix="stackcat-fasttext-", dir=scratch_dir())
    os.close(fd)
    try:
        model.save_model(path)
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(path)


def _model_from_bytes(blob: bytes) -> Any:
    import fasttext

    fd, path = tempfile.mkstemp(suffix=".bin", prefix="stackcat-fasttext-", dir=scratch_dir())
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
        return fasttext.load_model(path)
    finally:
        os.unlink(path)
