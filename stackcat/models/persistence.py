"""Saving and pickling the torch estimators: weight files, ``estimator.json``, in-memory tars.

:class:`SavableTorchMixin` gives an estimator ``save(path)`` / ``load(path)``
folders and pickling; a fine-tuned text encoder is written with ``save_pretrained``
(:func:`save_text_module`), the rest of the module as ``head.pt``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import torch
from torch import nn

from stackcat.features import hub

__all__ = ["SavableTorchMixin", "bytes_to_folder", "folder_to_bytes", "load_non_encoder_state",
           "load_saved_encoder", "non_encoder_state", "save_text_module"]


def non_encoder_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state outside ``encoder.*`` (saved next to the encoder's own checkpoint)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if not k.startswith("encoder.")}


def save_text_module(folder: Path, module: nn.Module, tokenizer: Any) -> None:
    """``folder/encoder`` and ``folder/tokenizer`` via ``save_pretrained``; the rest in ``head.pt``."""
    with hub.quiet_transformers():
        module.encoder.save_pretrained(folder / "encoder")
        tokenizer.save_pretrained(folder / "tokenizer")
    torch.save(non_encoder_state(module), folder / "head.pt")


def load_non_encoder_state(module: nn.Module, folder: Path) -> None:
    """Load ``folder/head.pt`` (written by :func:`save_text_module`) into ``module``."""
    path = folder / "head.pt"
    missing, unexpected = module.load_state_dict(torch.load(path, weights_only=True), strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing}, unexpected {unexpected}")


def load_saved_encoder(folder: Path) -> tuple[nn.Module, Any]:
    """``(encoder, tokenizer)`` from ``folder/encoder`` and ``folder/tokenizer``."""
    from transformers import AutoModel, AutoTokenizer

    with hub.quiet_transformers():
        return (AutoModel.from_pretrained(folder / "encoder"),
                AutoTokenizer.from_pretrained(folder / "tokenizer"))


def folder_to_bytes(folder: str | os.PathLike) -> bytes:
    """The files of ``folder`` as an uncompressed tar, in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(str(folder), arcname=".")
    return buffer.getvalue()


def bytes_to_folder(blob: bytes, folder: str | os.PathLike) -> None:
    """Unpack a tar made by :func:`folder_to_bytes` into ``folder``."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(str(folder), filter="data")


def _to_json_value(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _json_ready(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class SavableTorchMixin:
    """``save(path)`` / ``load(path)`` folders and pickling for estimators holding torch state.

    Subclasses name their torch attributes in ``_torch_attributes`` and implement
    ``_save_weights(folder)`` / ``_load_weights(folder)``. The folder holds those
    weight files plus ``estimator.json`` (class, params, ``classes_`` and other
    JSON-able fitted attributes); params that are not JSON-able (an encoder
    object) go to ``params.joblib``. Pickling stores the weight files as an
    in-memory tar.
    """

    _torch_attributes: tuple[str, ...] = ()
    _transient_attributes: tuple[str, ...] = ()  # caches, rebuilt on demand; never saved
    _ESTIMATOR_FILE = "estimator.json"
    _OBJECT_PARAMS_FILE = "params.joblib"

    def _save_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def _load_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted model into the folder ``path`` (created; must be empty if it exists).

        Returns
        -------
        pathlib.Path
            The folder, which :meth:`load` reads back.
        """
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "classes_")
        folder = Path(path)
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} exists and is not empty; give save() a new folder")
        record = self._json_record()
        folder.mkdir(parents=True, exist_ok=True)
        object_params = {k: v for k, v in self.get_params(deep=False).items()
                         if k not in record["params"]}
        if object_params:
            joblib.dump(object_params, folder / self._OBJECT_PARAMS_FILE)
        self._save_weights(folder)
        (folder / self._ESTIMATOR_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False),
                                                   encoding="utf-8")
        return folder

    def _json_record(self) -> dict[str, Any]:
        """Class, JSON-able params, classes_ and the other fitted attributes, for estimator.json."""
        params = {k: _to_json_value(v) for k, v in self.get_params(deep=False).items()}
        fitted = {k: _to_json_value(v) for k, v in vars(self).items()
                  if k.endswith("_") and not k.startswith("_") and k != "classes_"
                  and k not in self._torch_attributes}
        for name, value in fitted.items():
            if not _json_ready(value):
                raise TypeError(f"cannot save the fitted attribute {name} (not JSON-able)")
        classes = self.classes_.tolist()
        if not _json_ready(classes):
            kinds = sorted({type(c).__name__ for c in classes})
            raise TypeError(f"cannot save classes_ of types {kinds} to JSON; use str or int labels "
                            "(joblib.dump works with any labels)")
        return {
            "estimator": type(self).__name__,
            "params": {k: v for k, v in params.items() if _json_ready(v)},
            "classes": classes,
            "classes_dtype": self.classes_.dtype.str,
            "fitted": fitted,
        }

    @classmethod
    def load(cls, path: str | os.PathLike, **params: Any) -> Any:
        """Read a folder written by :meth:`save`; ``params`` override saved ones (e.g. ``device``)."""
        folder = Path(path)
        record_file = folder / cls._ESTIMATOR_FILE
        if not record_file.is_file():
            raise FileNotFoundError(f"{folder} is not a saved {cls.__name__} (no {cls._ESTIMATOR_FILE})")
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record["estimator"] != cls.__name__:
            raise TypeError(f"{folder} holds a {record['estimator']}, not a {cls.__name__}")
        saved = dict(record["params"])
        if (folder / cls._OBJECT_PARAMS_FILE).is_file():
            saved.update(joblib.load(folder / cls._OBJECT_PARAMS_FILE))
        unknown = sorted(set(saved) - set(cls._get_param_names()))
        if unknown:
            raise ValueError(f"{folder}: saved with params {unknown} that {cls.__name__} no longer has (renamed in "
                             "stackcat 0.2, see CHANGELOG.md); fit the model again")
        estimator = cls(**{**saved, **params})
        dtype = np.dtype(record["classes_dtype"])
        estimator.classes_ = np.asarray(record["classes"], dtype=dtype)
        for key, value in record["fitted"].items():
            setattr(estimator, key, value)
        estimator._load_weights(folder)
        return estimator

    def __getstate__(self) -> dict[str, Any]:
        skip = set(self._torch_attributes) | set(self._transient_attributes)
        state = {k: v for k, v in super().__getstate__().items() if k not in skip}
        if all(hasattr(self, name) for name in self._torch_attributes):
            with tempfile.TemporaryDirectory(prefix="stackcat-pickle-") as tmp:
                self._save_weights(Path(tmp))
                state["_weights_tar"] = folder_to_bytes(tmp)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.pop("_weights_tar", None)
        super().__setstate__(state)
        if blob is not None:
            tmp = tempfile.mkdtemp(prefix="stackcat-unpickle-")
            try:
                bytes_to_folder(blob, tmp)
                self._load_weights(Path(tmp))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

