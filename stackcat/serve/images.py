"""Images sent to the service: a path under the configured image roots, or uploaded bytes.

``ImagePolicy`` turns what a request gives into a file the models may read,
or a :class:`~stackcat.serve.inputs.RequestError` naming the field: a path
outside every image root, a missing file, a file over the fit's pixel limit
(:data:`stackcat.features.images.DEFAULT_MAX_PIXELS`, checked from the header
before decoding) or one no decoder reads. Uploaded bytes are written to a
private temporary folder for the time of the prediction.

Examples
--------
>>> policy = ImagePolicy(roots=[])
>>> try:
...     policy.path_image("/etc/passwd", "products[0].image_path")
... except RequestError as error:
...     print(error.field, error.status)
products[0].image_path 422
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from stackcat.features.images import DEFAULT_MAX_PIXELS, image_statuses
from stackcat.serve.inputs import RequestError

STATUS_MESSAGES = {
    "missing": "no such image file",
    "too_large": "the image has more pixels than the fit's limit ({max_pixels:,})",
    "corrupt": "not a readable image",
}


class ImagePolicy:
    """Which images the service reads, and where uploaded ones are kept meanwhile.

    Parameters
    ----------
    roots : sequence of path
        Folders whose files a request may name (relative paths start from the first).
    max_pixels : int, default=DEFAULT_MAX_PIXELS
        The fit's pixel limit: larger images are refused.
    """

    def __init__(self, roots: Sequence[str | os.PathLike], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.roots = [Path(root).resolve() for root in roots]
        self.max_pixels = max_pixels
        self._uploads = tempfile.TemporaryDirectory(prefix="stackcat-serve-uploads-")

    def path_image(self, value: object, field: str) -> str:
        """The checked file of an image path given in a request."""
        if not isinstance(value, str) or not value.strip():
            raise RequestError(field, "an image path must be a non-empty string")
        if not self.roots:
            raise RequestError(field, "this server reads no image paths (start it with --image-root DIR); "
                                      "upload the image instead (image_base64 or multipart)")
        given = Path(value)
        path = (given if given.is_absolute() else self.roots[0] / given).resolve()
        if not any(path.is_relative_to(root) for root in self.roots):
            raise RequestError(field, f"{value!r} is outside the image roots this server may read", status=403)
        return self._checked(str(path), field)

    def uploaded_image(self, data: bytes | str, field: str) -> str:
        """A temporary file holding uploaded bytes (base64 text or raw bytes), checked like a path."""
        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(field, "not valid base64") from None
        if not isinstance(data, bytes) or not data:
            raise RequestError(field, "an uploaded image must be non-empty bytes (base64 text in JSON)")
        path = Path(self._uploads.name) / f"{uuid.uuid4().hex}.img"
        path.write_bytes(data)
        try:
            return self._checked(str(path), field)
        except RequestError:
            path.unlink(missing_ok=True)
            raise

    def is_root_file(self, path: str) -> bool:
        """Whether ``path`` lies under an image root (a product's photo the page may show later)."""
        resolved = Path(path).resolve()
        return any(resolved.is_relative_to(root) for root in self.roots)

    def release(self, paths: Sequence[str | None]) -> None:
        """Delete the temporary files of uploaded images once predicted."""
        upload_dir = Path(self._uploads.name)
        for path in paths:
            if path and Path(path).parent == upload_dir:
                Path(path).unlink(missing_ok=True)

    def _checked(self, path: str, field: str) -> str:
        status = image_statuses([path], max_pixels=self.max_pixels)[0]
        if status != "ok":
            status_code = 413 if status == "too_large" else 422
            raise RequestError(field, STATUS_MESSAGES[status].format(max_pixels=self.max_pixels),
                               status=status_code)
        return path

    def close(self) -> None:
        self._uploads.cleanup()


__all__ = ["ImagePolicy"]
