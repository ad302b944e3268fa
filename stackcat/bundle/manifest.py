"""A bundle's manifest: the sha256 of every file and the format version, written last and checked first.

Examples
--------
>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> _ = (folder / "classes.json").write_text("[]")
>>> manifest = write_manifest(folder, {"model_version": "demo"})
>>> sorted(check_manifest(folder)["files"])
['classes.json']
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stackcat.files import write_text_atomic

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_FILE", "BundleError", "check_manifest", "file_digests",
           "read_manifest", "write_manifest"]

FORMAT_NAME = "stackcat-bundle"
# Raised when a release writes something an older one would misread; a newer bundle is refused.
FORMAT_VERSION = 1
MANIFEST_FILE = "bundle.json"
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A folder is not a bundle this release can load: changed, incomplete or of a newer format."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _bundle_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p != folder / MANIFEST_FILE)


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``folder`` but the manifest."""
    return {name: {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size}
            for name in _bundle_files(folder)}


def write_manifest(folder: Path, fields: dict[str, Any], files: dict[str, dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    """Write the manifest of ``folder`` (flushed to disk) with ``fields`` and its files' digests
    (``files``, from :func:`file_digests`: hashed now when not given)."""
    files = file_digests(folder) if files is None else files
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **fields, "files": files}
    write_text_atomic(folder / MANIFEST_FILE, json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder``, its format version checked."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST_FILE}; not a stackcat bundle (write one with `stackcat export`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); the bundle is damaged, export it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: not a stackcat bundle manifest (no \"format\": \"{FORMAT_NAME}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{path}: format_version {version!r} is not a format version")
    if version > FORMAT_VERSION:
        from stackcat import __version__

        raise BundleError(f"{folder}: bundle format version {version} is newer than this stackcat "
                          f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade stackcat to load it")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path}: no \"files\" table")
    return manifest


def check_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, after checking that the files are exactly those listed, with their sha256.

    Raises
    ------
    BundleError
        Naming the first changed, missing or extra file.
    """
    manifest = read_manifest(folder)
    listed = manifest["files"]
    present = set(_bundle_files(folder))
    missing = sorted(set(listed) - present)
    if missing:
        raise BundleError(f"{folder}: file {missing[0]} is missing ({len(missing)} missing in all); "
                          "the bundle is incomplete, export it again")
    extra = sorted(present - set(listed))
    if extra:
        raise BundleError(f"{folder}: file {extra[0]} is not in {MANIFEST_FILE} ({len(extra)} extra in all); "
                          "a bundle is loaded only as it was written")
    for name, entry in listed.items():
        if (folder / name).is_symlink():
            raise BundleError(f"{folder}: file {name} is a symbolic link; a bundle holds plain files only")
        if _sha256(folder / name) != entry.get("sha256"):
            raise BundleError(f"{folder}: file {name} was changed since the bundle was written (its sha256 "
                              f"differs from {MANIFEST_FILE}); export the bundle again")
    return manifest
