"""Loading product images safely, and embedding them once with a frozen encoder.

Image policy (:func:`load_image`): every image comes back as RGB or not at all,
with a status that says why:

==============  ===============================================================
``ok``          decoded; grey, CMYK, palette and 16-bit images converted to RGB,
                transparency composited on white, EXIF orientation applied;
                thinner than 1:``MAX_ASPECT_RATIO``: centre-cropped to that ratio
``no_path``     the row has no path (None, NaN or an empty string)
``missing``     no readable file at the path
``too_large``   more than ``max_pixels`` pixels (checked from the header, before
                decoding), or refused by Pillow's decompression-bomb guard
``corrupt``     not an image, truncated, or not convertible to RGB
==============  ===============================================================

Memory: the work an image causes is bounded by its output, not its file.
Encoders resize the short side to 224-336 px and centre-crop a square, so a
thin image (a 198-byte 40000 x 1 PNG) would be blown up to 224 x 8,960,000
pixels (8.9 GB). Keeping the centre at most ``MAX_ASPECT_RATIO`` times longer
than wide changes nothing a centre-cropping encoder sees and bounds that
resize to a few MB. A large image is converted to RGB strip by strip (alpha
compositing and 16-bit grey would otherwise cost several copies of it), and
with ``draft_size`` (as when embedding) reduced by an integer factor on the
way (JPEGs are decoded reduced). What remains is the decoded image itself:
at most ``max_pixels`` times its bytes per pixel.

Embeddings (:func:`image_embeddings`): a row whose image is unusable gets a zero
vector and ``ok=False``; nothing stops the run. With ``cache_dir`` each image is
encoded once per encoder, whatever the number of folds, models and processes
that ask for it.

Cache design
------------
Key: the encoder's ``name`` + a BLAKE2b-128 hash of the image file's bytes.
Content, not (path, size, mtime): identical photos under several paths (a
product's colour variants) are encoded once; a data set copied to another
folder or another machine (a Dask worker) reuses its cache; a file replaced in
place is never served a stale vector. The price, reading each file once per
process to hash it, is small next to decoding and encoding it; within a process
the hash is remembered per (path, size, mtime) (:func:`stackcat.files.file_digest`).

Storage: a :class:`stackcat.features.store.EmbeddingStore` per encoder name (see
:mod:`stackcat.features.store`): ``<cache_dir>/<encoder slug>/shard-*.bin`` + ``.idx`` files,
one float32 vector per entry, each atomic (bytes first, then a checksummed record:
a reader sees a whole entry or none, whatever runs concurrently or is killed
mid-write); a damaged entry is recomputed and rewritten. Entries are small and
independent, so parallel fold jobs need no lock; to encode each image exactly
once when jobs start at the same time, fill the cache first with one call on
all the paths. Without ``cache_dir``, a bounded in-process memory cache (LRU,
:data:`MEMORY_CACHE_BYTES`) still avoids re-encoding within one process.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from stackcat.features.image_encoders import ImageEncoder, get_encoder
from stackcat.features.store import MEMORY_CACHE_BYTES, EmbeddingStore, MemoryCache
from stackcat.files import as_file_path as _as_file_path
from stackcat.files import file_content_hash, file_digest, forget_digests
from stackcat.progress import log_stage, progress_bar, rate

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "IMAGE_STATUSES",
    "MEMORY_CACHE_BYTES",
    "ImageEmbeddings",
    "clear_memory_cache",
    "file_content_hash",
    "image_embeddings",
    "image_statuses",
    "load_image",
    "to_rgb",
]

#: Larger images are refused before decoding (a 48 MP phone photo still passes).
DEFAULT_MAX_PIXELS = 50_000_000
#: Thinner images are centre-cropped to this ratio of long to short side.
MAX_ASPECT_RATIO = 20
IMAGE_STATUSES = ("ok", "no_path", "missing", "too_large", "corrupt")
# JPEGs are decoded at a reduced scale when they are much larger than this (PIL draft mode);
# encoders look at 224-336 px.
_DRAFT_SIZE = 512
# A reduced-size decode is enough to tell ok / missing / corrupt / too large.
_STATUS_DRAFT_SIZE = 64


def load_image(
    path: str | os.PathLike | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> tuple[Image.Image | None, str]:
    """Open one image as RGB, or say why it cannot be used.

    Parameters
    ----------
    path : str, path-like or None
        The image file. None, NaN and ``""`` give status ``"no_path"``.
    max_pixels : int, default=DEFAULT_MAX_PIXELS
        Images with more pixels (width x height, read from the file header, before
        any decoding) are refused with ``"too_large"``.
    draft_size : int or None, default=None
        When set, a JPEG at least twice this size on both sides is decoded at a
        reduced scale (1/2, 1/4 or 1/8) that stays at least this size: much faster
        and lighter for large photos that will be shrunk anyway.

    Returns
    -------
    image : PIL.Image.Image or None
        RGB image, fully loaded (the file is closed), or None.
    status : str
        One of :data:`IMAGE_STATUSES` (see the module docstring).

    Examples
    --------
    >>> image, status = load_image("no/such/file.jpg")
    >>> image, status
    (None, 'missing')
    >>> load_image(None)[1]
    'no_path'
    """
    file_path = _as_file_path(path)
    if file_path is None:
        return None, "no_path"
    if not os.path.isfile(file_path):
        return None, "missing"
    try:
        with open(file_path, "rb") as handle:
            return _decode(handle, max_pixels=max_pixels, draft_size=draft_size)
    except OSError:
        return None, "missing"


def image_statuses(paths: Sequence[Any], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[str]:
    """The :func:`load_image` status of each path (one of :data:`IMAGE_STATUSES`), in order.

    A JPEG is decoded at a reduced scale (``draft_size=64``): enough to tell a
    usable image from a missing, corrupt or too large one, at a fraction of a
    full decode.

    Examples
    --------
    >>> image_statuses(["no/such/file.jpg", None])
    ['missing', 'no_path']
    """
    return [load_image(path, max_pixels=max_pixels, draft_size=_STATUS_DRAFT_SIZE)[1] for path in paths]


def _decode(source: Any, *, max_pixels: int, draft_size: int | None) -> tuple[Image.Image | None, str]:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Our own max_pixels check comes first; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if image.width * image.height > max_pixels:
                    return None, "too_large"
                if draft_size and image.format == "JPEG":
                    image.draft("RGB", (draft_size, draft_size))
                image.load()
                image = _centre_cropped(image, MAX_ASPECT_RATIO)
                factor = max(1, min(image.size) // draft_size) if draft_size else 1
                if factor >= 2 or image.width * image.height > _STRIP_PIXELS:
                    return _reduced_rgb(image, factor), "ok"
                return to_rgb(image), "ok"
    except Image.DecompressionBombError:
        return None, "too_large"
    except MemoryError:
        return None, "too_large"
    except Exception:  # noqa: BLE001 - any decoder failure (OSError, SyntaxError, struct.error, ...)
        return None, "corrupt"


def _centre_cropped(image: Image.Image, max_ratio: float) -> Image.Image:
    """The centre of ``image``, at most ``max_ratio`` times longer than its short side."""
    width, height = image.size
    short = max(1, min(width, height))
    keep = int(short * max_ratio)
    if width > keep:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    if height > keep:
        top = (height - keep) // 2
        return image.crop((0, top, width, top + keep))
    return image


def _reduced_rgb(image: Image.Image, factor: int) -> Image.Image:
    """``to_rgb(image).reduce(factor)``, converted strip by strip.

    Converting a large image whole (alpha compositing, 16-bit to 8-bit,
    Pillow's premultiplied copy in ``reduce``) costs several copies of it;
    strips of about :data:`_STRIP_PIXELS` pixels keep the extra memory small.
    """
    from PIL import Image

    width, height = image.size
    grey_scale = _grey_scale(image) if image.mode in _WIDE_GREY_MODES else None
    rows = factor * max(1, _STRIP_PIXELS // (width * factor))  # a multiple of factor: same boxes as whole
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        rgb = _plain_rgb(strip, grey_scale)
        out.paste(rgb.reduce(factor) if factor > 1 else rgb, (0, top // factor))
    return _exif_oriented(out, image)


_STRIP_PIXELS = 1 << 20
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of ``image``: EXIF orientation applied, alpha composited on white.

    Handles grey (``L``, ``1``), 16/32-bit grey (``I;16``, ``I``, ``F``), palette
    (``P``, with or without transparency), ``LA``, ``RGBA``, ``CMYK``, ``YCbCr``.

    Examples
    --------
    >>> from PIL import Image
    >>> to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0))
    (255, 255, 255)
    """
    return _plain_rgb(_exif_oriented(image, image))


def _exif_oriented(image: Image.Image, source: Image.Image) -> Image.Image:
    """``image`` turned as the EXIF orientation of ``source`` says (``source`` may be its larger original)."""
    from PIL import Image

    try:
        orientation = source.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the picture
        return image
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    return image.transpose(method) if method is not None else image


def _plain_rgb(image: Image.Image, grey_scale: tuple[float, float] | None = None) -> Image.Image:
    """``to_rgb`` without the EXIF orientation; ``grey_scale`` fixes the 16/32-bit grey scaling."""
    from PIL import Image

    if image.mode in _WIDE_GREY_MODES:
        image = _to_8bit_grey(image, grey_scale)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _grey_scale(image: Image.Image) -> tuple[float, float]:
    """``(multiplier, divisor)`` mapping a 16/32-bit grey or float image onto 0..255, from its largest value."""
    try:
        largest = float(image.getextrema()[1])
    except (TypeError, ValueError, IndexError):
        largest = math.nan
    if math.isnan(largest):  # getextrema does not skip NaN: look at the values (rare)
        values = np.asarray(image, dtype=np.float64)
        largest = float(np.nanmax(values)) if values.size and not np.isnan(values).all() else 0.0
    if image.mode == "F" and largest <= 1.0:
        return 255.0, 1.0
    if largest > 255:
        return 1.0, 257.0  # 16-bit range onto 8 bits
    return 1.0, 1.0


def _to_8bit_grey(image: Image.Image, scale: tuple[float, float] | None = None) -> Image.Image:
    from PIL import Image

    multiplier, divisor = scale if scale is not None else _grey_scale(image)
    values = np.asarray(image, dtype=np.float64)
    if not values.flags.writeable:
        values = values.copy()
    values *= multiplier
    values /= divisor
    np.nan_to_num(values, copy=False)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8), mode="L")


class ImageEmbeddings(tuple):
    """``(embeddings, ok)``, unpackable as a pair, that also carries each row's load status.

    Attributes
    ----------
    embeddings : ndarray of shape (n, dim), float32
        Zero rows where ``ok`` is False.
    ok : ndarray of shape (n,), bool
    status : ndarray of shape (n,), object
        One of :data:`IMAGE_STATUSES` per row (a cached image counts as ``"ok"``).
    status_counts : dict
        Rows per status, every status listed (zeros included).
    """

    def __new__(cls, embeddings: np.ndarray, ok: np.ndarray, status: np.ndarray) -> ImageEmbeddings:
        result = super().__new__(cls, (embeddings, ok))
        result.status = status
        return result

    def __getnewargs__(self) -> tuple:
        return (self[0], self[1], self.status)

    @property
    def embeddings(self) -> np.ndarray:
        return self[0]

    @property
    def ok(self) -> np.ndarray:
        return self[1]

    @property
    def status_counts(self) -> dict[str, int]:
        counts = Counter(self.status.tolist())
        return {name: int(counts.get(name, 0)) for name in IMAGE_STATUSES}


def image_embeddings(
    paths: Sequence[str | None],
    encoder: ImageEncoder | str,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    dtype: np.dtype | type = np.float32,
) -> ImageEmbeddings:
    """Embed the image of every row with a frozen encoder, encoding each image at most once.

    Parameters
    ----------
    paths : sequence of str or None
        One image path per row; None/NaN/"" for rows without an image.
    encoder : ImageEncoder or str
        An encoder object, or a spec for :func:`stackcat.features.image_encoders.get_encoder`
        (``"ViT-L-14/openai"``, ``"efficientnet-lite0"``, ...).
    cache_dir : str, path-like or None, default=None
        Folder of the on-disk embedding cache (created when needed). See the module
        docstring for its keys and layout.
    batch_size : int, default=64
        Images decoded and passed to ``encoder.encode`` at a time.
    device : str, default="auto"
        Device of an encoder built from a string spec.
    progress : bool, default=True
        Show a bar (on a terminal) while encoding images that are not cached; a
        line with the count and rate goes to the ``"stackcat"`` logger either way.
    max_pixels : int, default=DEFAULT_MAX_PIXELS
        Larger images get status ``"too_large"``.
    dtype : numpy dtype, default=np.float32
        What the vectors are cached and returned as (``np.float16`` halves the cache
        of large outputs such as feature maps). An encoder's vectors are cached in one
        dtype: another one is a separate cache.

    Returns
    -------
    ImageEmbeddings
        Unpacks as ``embeddings, ok``: ``(n, dim)`` float32 (zero rows where the
        image is unusable) and a bool mask; ``.status`` / ``.status_counts`` say why
        rows failed. ``dim`` is 0 when no image is usable and the encoder has no
        ``dim`` attribute.

    Raises
    ------
    ValueError
        When the encoder returns the wrong number of rows, or vectors of a size
        that differs from cached ones.

    Examples
    --------
    >>> import numpy as np
    >>> class MeanColour:
    ...     name = "mean-colour"
    ...     def encode(self, images):
    ...         return np.array([np.asarray(im, np.float32).mean((0, 1)) for im in images])
    >>> from stackcat.demo import load_demo
    >>> frame, _ = load_demo(n_rows=80)
    >>> embeddings, ok = image_embeddings(list(frame["image_path"]) + [None], MeanColour(),
    ...                                   progress=False)
    >>> embeddings.shape, int(ok.sum())
    ((81, 3), 80)
    """
    encoder = get_encoder(encoder, device=device)
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    status = np.full(len(paths), "ok", dtype=object)
    row_keys: list[str | None] = []
    first_path: dict[str, str] = {}
    for row, raw in enumerate(paths):
        key, row_status, file_path = _content_key(raw)
        row_keys.append(key)
        if key is None:
            status[row] = row_status
        else:
            first_path.setdefault(key, file_path)

    store = _embedding_store(encoder.name, cache_dir, dtype)
    vectors = store.get_many(list(first_path))
    to_encode = [(key, path) for key, path in first_path.items() if key not in vectors]
    failed = _encode_missing(to_encode, encoder, store, vectors, batch_size=batch_size,
                             progress=progress, max_pixels=max_pixels)
    return _assemble(row_keys, status, vectors, failed, getattr(encoder, "dim", None), store.dtype)


def _encode_missing(
    to_encode: list[tuple[str, str]],
    encoder: ImageEncoder,
    store: EmbeddingStore,
    vectors: dict[str, np.ndarray],
    *,
    batch_size: int,
    progress: bool,
    max_pixels: int,
) -> dict[str, str]:
    """Decode and encode the images not in the cache, batch by batch; returns key -> failure status."""
    failed: dict[str, str] = {}
    if not to_encode:
        return failed
    workers = max(1, min(8, os.cpu_count() or 1))
    bar = progress_bar(total=len(to_encode), unit="img", desc=f"encoding images [{encoder.name}]",
                       enabled=progress)
    began = time.perf_counter()
    batches = [to_encode[start:start + batch_size] for start in range(0, len(to_encode), batch_size)]
    with bar, ThreadPoolExecutor(max_workers=workers) as pool, ThreadPoolExecutor(max_workers=1) as ahead:
        def decode(batch: list[tuple[str, str]]) -> list:
            # Decoding releases the GIL: threads overlap it on many-core machines.
            return list(pool.map(
                lambda item: load_image(item[1], max_pixels=max_pixels, draft_size=_DRAFT_SIZE), batch))

        # The next batch is decoded while the encoder runs on this one.
        pending = ahead.submit(decode, batches[0])
        for index, batch in enumerate(batches):
            loaded = pending.result()
            if index + 1 < len(batches):
                pending = ahead.submit(decode, batches[index + 1])
            good_keys = [key for (key, _), (image, _) in zip(batch, loaded) if image is not None]
            failed.update({key: st for (key, _), (image, st) in zip(batch, loaded) if image is None})
            images = [image for image, _ in loaded if image is not None]
            if images:
                encoded = _checked_output(encoder.encode(images), len(images), encoder.name)
                for key, vector in zip(good_keys, encoded):
                    vectors[key] = store.put(key, vector)  # as cached: a later read returns the same
            bar.update(len(batch))
    log_stage(f"[{encoder.name}] " + rate(len(to_encode) - len(failed), "images encoded", time.perf_counter() - began)
              + (f", {len(failed)} unusable" if failed else ""))
    return failed


def _checked_output(output: Any, n_images: int, encoder_name: str) -> np.ndarray:
    array = np.asarray(output, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != n_images:
        raise ValueError(
            f"encoder {encoder_name!r} returned an array of shape {array.shape} for {n_images} images; "
            f"expected ({n_images}, dim)"
        )
    return array


def _assemble(
    row_keys: list[str | None],
    status: np.ndarray,
    vectors: dict[str, np.ndarray],
    failed: dict[str, str],
    encoder_dim: int | None,
    dtype: np.dtype,
) -> ImageEmbeddings:
    dims = {vector.shape[0] for vector in vectors.values()}
    if len(dims) > 1:
        raise ValueError(
            f"the encoder's vectors have different sizes {sorted(dims)} (cached vs new?): "
            f"an encoder's name must change when its output changes"
        )
    dim = dims.pop() if dims else int(encoder_dim or 0)
    embeddings = np.zeros((len(row_keys), dim), dtype=dtype)
    ok = np.zeros(len(row_keys), dtype=bool)
    for row, key in enumerate(row_keys):
        if key is None:
            continue
        if key in vectors:
            embeddings[row] = vectors[key]
            ok[row] = True
        else:
            status[row] = failed[key]
    return ImageEmbeddings(embeddings, ok, status)


def _content_key(raw_path: Any) -> tuple[str | None, str, str | None]:
    """``(content hash, status, path)``; the hash is None when the row has no readable file."""
    path = _as_file_path(raw_path)
    if path is None:
        return None, "no_path", None
    try:
        return file_digest(path), "ok", path
    except (OSError, ValueError):  # ValueError: a path with a NUL byte
        return None, "missing", path


# Budget: MEMORY_CACHE_BYTES (least recently used embeddings are dropped).
_memory_cache = MemoryCache(MEMORY_CACHE_BYTES)


def clear_memory_cache() -> None:
    """Forget the embeddings (and file hashes) remembered by this process."""
    _memory_cache.clear()
    forget_digests()


def _embedding_store(encoder_name: str, cache_dir: str | os.PathLike | None,
                     dtype: np.dtype | type = np.float32) -> EmbeddingStore:
    """The memory LRU in front of the optional on-disk cache of one encoder's vectors."""
    return EmbeddingStore(encoder_name, cache_dir, dtype=dtype, ndim=1, memory=_memory_cache,
                          what="image embedding")
