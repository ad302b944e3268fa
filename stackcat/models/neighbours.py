"""NeighboursClassifier: cosine k-nearest neighbours on the run's cached text or image embeddings.

The embeddings are the ones other members already compute, read from the same
caches: a text is the mean of its frozen-encoder token states
(:func:`stackcat.features.text_states.token_states`, shared with
``BertClassifier(freeze_encoder=True)``), an image its frozen image-encoder vector
(:func:`stackcat.features.images.image_embeddings`, shared with ``ImageEmbeddingClassifier``).
Vectors are L2-normalized, so an inner product is a cosine.

Search is exact by default: query rows go through BLAS in chunks of ``chunk_size``
rows against all training rows, so memory stays at ``chunk_size x n_train``
similarities. ``backend="faiss"`` (pip extra ``stackcat[faiss]``) searches a faiss
flat inner-product index instead, for millions of rows.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from stackcat.features.hub import DEFAULT_TEXT_MODEL
from stackcat.features.image_encoders import DEFAULT_IMAGE_ENCODER
from stackcat.models._base import ProbaClassifierMixin, as_texts, column_values, encode_labels

# A fitted model's index_ (float16: half the memory and disk) as float32 for BLAS, converted once per
# fitted index instead of on every call; kept beside the model, not in it, so that neither its pickle
# nor its bundle grows.
_FLOAT32_INDEX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def l2_normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32; all-zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def nearest_neighbours(queries: np.ndarray, index: np.ndarray, k: int, *,
                       chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest inner products of each query row with the index rows, exactly.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, dim), float32
    index : ndarray of shape (n_index, dim), float32
    k : int
        Neighbours per query (at most ``n_index``).
    chunk_size : int, default=1024
        Query rows scored at a time: memory is ``chunk_size x n_index`` floats.

    Returns
    -------
    similarities, positions : ndarray of shape (n_queries, k)
        Each row sorted by decreasing similarity (float32), and the index rows they belong to.

    Examples
    --------
    >>> index = np.eye(3, dtype=np.float32)
    >>> sims, rows = nearest_neighbours(np.array([[0.6, 0.8, 0]], np.float32), index, 2)
    >>> rows.tolist(), [round(float(s), 2) for s in sims[0]]
    ([[1, 0]], [0.8, 0.6])
    """
    k = min(int(k), len(index))
    similarities = np.empty((len(queries), k), dtype=np.float32)
    positions = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk_size):
        scores = queries[start:start + chunk_size] @ index.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
            np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        similarities[start:start + chunk_size] = np.take_along_axis(top_scores, order, axis=1)
        positions[start:start + chunk_size] = np.take_along_axis(top, order, axis=1)
    return similarities, positions


def faiss_nearest_neighbours(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest_neighbours` through a faiss ``IndexFlatIP`` (exact; needs ``faiss-cpu``)."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("backend='faiss' needs the faiss-cpu package: pip install 'stackcat[faiss]'") from exc
    k = min(int(k), len(index))
    flat = faiss.IndexFlatIP(index.shape[1])
    flat.add(np.ascontiguousarray(index, dtype=np.float32))
    similarities, positions = flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return similarities.astype(np.float32), positions.astype(np.int64)


def neighbour_votes(similarities: np.ndarray, neighbour_labels: np.ndarray, n_classes: int,
                    temperature: float) -> np.ndarray:
    """``(n, n_classes)`` votes: each neighbour weighs ``softmax(similarity / temperature)`` over its row.

    Examples
    --------
    >>> neighbour_votes(np.array([[0.9, 0.9, 0.1]]), np.array([[1, 0, 1]]), 2, 1e-3).round(3).tolist()
    [[0.5, 0.5]]
    """
    logits = similarities.astype(np.float64) / temperature
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    votes = np.zeros((len(similarities), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(similarities)), similarities.shape[1]), neighbour_labels.ravel()),
              weights.ravel())
    return votes


class NeighboursClassifier(ProbaClassifierMixin, ClassifierMixin, BaseEstimator):
    """Distance-weighted cosine k-nearest neighbours on cached frozen text or image embeddings.

    Each of the ``n_neighbors`` most similar training rows votes for its class
    with weight ``softmax(cosine / temperature)`` (over the row's neighbours):
    a low temperature trusts the nearest neighbour most, a high one gives every
    neighbour the same vote. The votes are mixed with the training class prior,
    ``(1 - smoothing) * votes + smoothing * prior``, so that no class seen in
    training gets a probability of exactly 0 (a meta-learner reading log-odds or
    ranks would otherwise see ties of zeros).

    Parameters
    ----------
    source : {"text", "image"}, default="text"
        Which embeddings: the mean-pooled token states of the frozen text encoder
        ``model_name`` (shared cache with ``BertClassifier(freeze_encoder=True)``),
        or the image encoder ``encoder``'s vectors (shared with ``ImageEmbeddingClassifier``).
    text_column : str, default="text"
        Column of X holding the text (source="text"; X may also be a plain list of strings).
    image_column : str, default="image_path"
        Column of X holding image paths (source="image"; X may also be a list of paths).
    model_name : str or path-like, default="cointegrated/rubert-tiny2"
        Text encoder: a Hugging Face hub name (cached, when offline) or a checkpoint folder.
    text_prefix : str, default=""
        Put before every text (e5: ``"passage: "``).
    max_length : int, default=128
        Tokens kept per text; the cache is per ``max_length``, like BertClassifier's.
    encoder : str or object, default="ViT-L-14/openai"
        Image encoder spec for :func:`stackcat.features.image_encoders.get_encoder`, or an encoder object.
    text_cache_dir : str, path-like or None, default=None
        The run's token-state cache folder, read when ``source="text"``
        (None: this process's memory only).
    image_cache_dir : str, path-like or None, default=None
        The run's image-embedding cache folder, read when ``source="image"``
        (None: this process's memory only).
    n_neighbors : int, default=20
        Neighbours that vote (fewer when there are fewer training rows).
    temperature : float, default=0.02
        Softmax temperature of the votes, in cosine units. Frozen-encoder cosines
        crowd into a narrow band (demo texts under e5-small: 90% of all pairs
        between 0.80 and 0.89, the 20 nearest neighbours between 0.89 and 0.98),
        hence a small value: on the demo data 0.01-0.02 is best for e5 text and
        EfficientNet-Lite0 images alike, 0.1 loses 0.08 weighted F1
        (experiments/results/members_demo.md).
    smoothing : float, default=0.01
        Weight of the training class prior mixed into every row.
    chunk_size : int, default=1024
        Query rows searched at a time (memory: ``chunk_size x n_train`` floats).
    backend : {"numpy", "faiss"}, default="numpy"
        Exact search through numpy matrix products, or through faiss (``stackcat[faiss]``).
    device : str, default="auto"
        Where an encoder runs when something is not cached.
    encode_batch_size : int, default=64
        Texts or images per encoder pass.
    progress : bool, default=True
        Progress bar while encoding what is not cached.

    Attributes
    ----------
    classes_ : ndarray
        The labels, sorted; columns of ``predict_proba`` follow this order.
    class_prior_ : ndarray of shape (n_classes,)
        Label frequencies of all training rows (also what a row without an image predicts).
    index_ : ndarray of shape (n_indexed, dim), float16
        Unit-length embeddings of the training rows that have one (every row for
        text, rows with a usable image for images); float16 halves the fitted
        model's size, and rounds cosines by less than 1e-3.
    index_labels_ : ndarray of shape (n_indexed,)
        Class index of each row of ``index_``.
    text_model_identity_ : str
        Content hash of the text encoder (source="text"): predicting refuses a changed checkpoint.

    Examples
    --------
    >>> import numpy as np
    >>> class MeanColour:  # any object with .name and .encode is an image encoder
    ...     name = "mean-colour"
    ...     def encode(self, images):
    ...         return np.array([np.asarray(im, np.float32).mean((0, 1)) for im in images])
    >>> from stackcat.demo import load_demo
    >>> frame, _ = load_demo(n_rows=300)
    >>> knn = NeighboursClassifier(source="image", encoder=MeanColour(), progress=False)
    >>> knn.fit(frame, frame["articleType"]).predict_proba(frame).shape
    (300, 75)
    >>> knn.embed(frame.head(2)).shape
    (2, 3)
    """

    # params that change how fast, not what, it learns: left out of the run folder's job keys
    _runtime_params = ("text_cache_dir", "image_cache_dir", "encode_batch_size", "progress")

    _parameter_constraints: dict = {
        "source": [StrOptions({"text", "image"})],
        "text_column": [str],
        "image_column": [str],
        "model_name": [str, os.PathLike],
        "text_prefix": [str],
        "max_length": [Interval(Integral, 1, None, closed="left")],
        "encoder": [str, HasMethods(["encode"])],
        "text_cache_dir": [str, os.PathLike, None],
        "image_cache_dir": [str, os.PathLike, None],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "smoothing": [Interval(Real, 0, 1, closed="both")],
        "chunk_size": [Interval(Integral, 1, None, closed="left")],
        "backend": [StrOptions({"numpy", "faiss"})],
        "device": [str],
        "encode_batch_size": [Interval(Integral, 1, None, closed="left")],
        "progress": ["boolean"],
    }

    def __init__(
        self,
        source: str = "text",
        text_column: str = "text",
        image_column: str = "image_path",
        model_name: str | os.PathLike = DEFAULT_TEXT_MODEL,
        text_prefix: str = "",
        max_length: int = 128,
        encoder: Any = DEFAULT_IMAGE_ENCODER,
        text_cache_dir: str | os.PathLike | None = None,
        image_cache_dir: str | os.PathLike | None = None,
        n_neighbors: int = 20,
        temperature: float = 0.02,
        smoothing: float = 0.01,
        chunk_size: int = 1024,
        backend: str = "numpy",
        device: str = "auto",
        encode_batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        self.source = source
        self.text_column = text_column
        self.image_column = image_column
        self.model_name = model_name
        self.text_prefix = text_prefix
        self.max_length = max_length
        self.encoder = encoder
        self.text_cache_dir = text_cache_dir
        self.image_cache_dir = image_cache_dir
        self.n_neighbors = n_neighbors
        self.temperature = temperature
        self.smoothing = smoothing
        self.chunk_size = chunk_size
        self.backend = backend
        self.device = device
        self.encode_batch_size = encode_batch_size
        self.progress = progress

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> NeighboursClassifier:
        """Embed the rows of ``X`` (from the cache where they are) and keep them as the search index."""
        values = self._values(X)
        self.classes_, y_index = encode_labels(y, len(values))
        self.class_prior_ = np.bincount(y_index, minlength=len(self.classes_)) / len(y_index)
        if self.source == "text":
            from stackcat.features.text_states import text_model_identity

            self.text_model_identity_ = text_model_identity(self.model_name)
        embeddings = self._embed_values(values)
        usable = _has_vector(embeddings)
        if not usable.any():
            raise ValueError(f"none of the {len(values)} training rows has a usable image in column "
                             f"{self.image_column!r}; cannot search neighbours")
        self.index_ = embeddings[usable].astype(np.float16)
        self.index_labels_ = y_index[usable]
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities ``(n_samples, n_classes)`` in ``classes_`` order; rows sum to 1.

        Rows without a vector (no usable image) get ``class_prior_``.
        """
        check_is_fitted(self, "index_")
        if self.source == "text":
            from stackcat.features.text_states import check_text_model

            check_text_model(self.model_name, self.text_model_identity_)
        queries = self._embed_values(self._values(X))
        proba = np.tile(self.class_prior_, (len(queries), 1))
        usable = _has_vector(queries)
        if usable.any():
            similarities, positions = self.kneighbors_similarities(queries[usable])
            votes = neighbour_votes(similarities, self.index_labels_[positions], len(self.classes_),
                                    self.temperature)
            proba[usable] = (1.0 - self.smoothing) * votes + self.smoothing * self.class_prior_
        return proba

    def file_columns(self) -> list[str]:
        """Columns of X whose files this model reads: the image column, for ``source="image"`` only."""
        return [self.image_column] if self.source == "image" else []

    def kneighbors_similarities(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cosines and ``index_`` rows of the ``n_neighbors`` nearest training rows of unit ``queries``."""
        check_is_fitted(self, "index_")
        index = self._float32_index()
        if self.backend == "faiss":
            return faiss_nearest_neighbours(queries, index, self.n_neighbors)
        return nearest_neighbours(queries, index, self.n_neighbors, chunk_size=self.chunk_size)

    def _float32_index(self) -> np.ndarray:
        known = _FLOAT32_INDEX.get(self)
        if known is None or known[0] is not self.index_:  # first call, or fitted again since
            known = (self.index_, self.index_.astype(np.float32))
            _FLOAT32_INDEX[self] = known
        return known[1]

    def embed(self, X: Any) -> np.ndarray:
        """``(n_rows, dim)`` float32 unit vectors of the rows of ``X`` (zero rows: no usable image).

        Reads and fills the same cache as fit and predict; needs no fitting.
        """
        return self._embed_values(self._values(X))

    def embed_texts(self, texts: Sequence[str], prefix: str | None = None) -> np.ndarray:
        """``(len(texts), dim)`` float32 unit vectors of ``texts`` under the text encoder.

        Parameters
        ----------
        texts : sequence of str
        prefix : str or None, default=None
            Put before each text; None uses ``text_prefix``. For e5, category
            names are embedded as ``"query: "`` or ``"passage: "``.
        """
        from stackcat.features.text_states import mean_pooled, token_states

        prefix = self.text_prefix if prefix is None else prefix
        states = token_states([prefix + text for text in as_texts(np.asarray(texts, dtype=object))],
                              self.model_name, int(self.max_length), cache_dir=self.text_cache_dir,
                              device=self.device, batch_size=self.encode_batch_size, progress=self.progress)
        if not states:
            return np.zeros((0, 0), dtype=np.float32)
        return l2_normalized(mean_pooled(states))

    def warm_cache(self, X: Any) -> None:
        """Encode every row of ``X`` into the ``source``'s cache folder once, before parallel fold jobs start."""
        if (self.text_cache_dir if self.source == "text" else self.image_cache_dir) is not None:
            self.embed(X)

    def _values(self, X: Any) -> np.ndarray:
        if self.source == "text":
            return column_values(X, self.text_column, what="text")
        return column_values(X, self.image_column, what="image")

    def _embed_values(self, values: np.ndarray) -> np.ndarray:
        if self.source == "text":
            return self.embed_texts(as_texts(values))
        from stackcat.features.image_encoders import get_encoder
        from stackcat.features.images import image_embeddings

        embedded = image_embeddings(list(values), get_encoder(self.encoder, device=self.device),
                                    cache_dir=self.image_cache_dir, batch_size=self.encode_batch_size,
                                    device=self.device, progress=self.progress)
        return l2_normalized(embedded.embeddings)

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags


def _has_vector(embeddings: np.ndarray) -> np.ndarray:
    return np.any(embeddings != 0, axis=1) if embeddings.shape[1] else np.zeros(len(embeddings), dtype=bool)
