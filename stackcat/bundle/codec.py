"""Fitted objects as JSON, arrays and model files that cannot run code when read.

:func:`encode` walks an object's state and returns a JSON tree; numeric arrays
go to an :class:`ArrayStore` (one ``.npz`` read with ``allow_pickle=False``),
and the models that have a format of their own are written next to it:
fastText ``.bin`` (or quantized ``.ftz``), CatBoost ``.cbm``, torch weights as
``.safetensors`` (plus ``save_pretrained`` folders for a fine-tuned encoder), and so
are the weight arrays an estimator names in ``_tensor_attributes``.
:func:`decode` rebuilds the objects, and only of the classes named in
:func:`known_classes`: a name read from the file is looked up there, never
imported.

Examples
--------
>>> import numpy as np
>>> store = ArrayStore()
>>> tree = encode({"weights": np.arange(3.0), "name": "a"}, "x", store, None)
>>> decode(tree, store, None)["weights"].tolist()
[0.0, 1.0, 2.0]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ArrayStore", "BundleFormatError", "decode", "encode", "encode_object", "known_class", "known_classes"]

_PRIMITIVES = (str, int, float, bool, type(None))


class BundleFormatError(ValueError):
    """A bundle holds something this release cannot read (an unknown class, a malformed node)."""


class ArrayStore:
    """Numeric arrays by key, written to and read from one ``.npz`` without pickle."""

    def __init__(self, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.arrays = dict(arrays or {})

    def put(self, key: str, array: np.ndarray) -> str:
        if key in self.arrays:
            raise BundleFormatError(f"two arrays under the key {key!r}")
        self.arrays[key] = np.ascontiguousarray(array)
        return key

    def get(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise BundleFormatError(f"the bundle's arrays have no {key!r}")
        return self.arrays[key]

    def write(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, **self.arrays)

    @classmethod
    def read(cls, path: Path) -> ArrayStore:
        with np.load(path, allow_pickle=False) as npz:
            return cls({key: npz[key] for key in npz.files})


# Every class a bundle may hold, by the name written in its JSON (``module.QualifiedName``). A name read
# from a file is looked up here first; only then is its module imported (lazily: a bundle without torch
# members loads without importing torch).
_KNOWN_CLASSES = frozenset({
    "stackcat.stacking.estimator.StackingCategorizer",
    "stackcat.models.fasttext.FastTextClassifier",
    "stackcat.models.lexical.TfidfClassifier",
    "stackcat.models.bert.BertClassifier",
    "stackcat.models.fusion.FusionClassifier",
    "stackcat.models.image.ImageEmbeddingClassifier",
    "stackcat.models.heads.TorchHeadClassifier",
    "stackcat.models.neighbours.NeighboursClassifier",
    "stackcat.models.metric.MetricSpaceClassifier",
    "stackcat.meta.learners.AverageBlend",
    "stackcat.meta.learners.EnsembleSelection",
    "stackcat.meta.learners.MulticlassMeta",
    "stackcat.meta.rerank.RerankMeta",
    "stackcat.meta.retrieval.NeighbourIndex",
    "stackcat.taxonomy.CategoryTree",
    "stackcat.features.image_encoders.EfficientNetLite0Encoder",
    "stackcat.features.image_encoders.EfficientNetLite2Encoder",
    "stackcat.features.image_encoders.OpenClipEncoder",
    "sklearn.pipeline.FeatureUnion",
    "sklearn.pipeline.Pipeline",
    "sklearn.feature_extraction.text.TfidfVectorizer",
    "sklearn.feature_extraction.text.TfidfTransformer",
    "sklearn.feature_extraction.text.CountVectorizer",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._label.LabelEncoder",
    "catboost.core.CatBoost",
    "catboost.core.CatBoostClassifier",
    "catboost.core.CatBoostRanker",
    "catboost.core.CatBoostRegressor",
})


def known_classes() -> frozenset[str]:
    """The names (``module.QualifiedName``) of every class a bundle may hold."""
    return _KNOWN_CLASSES


@cache
def known_class(name: str) -> type:
    """The class of a known ``name``; a name outside :func:`known_classes` is refused, never imported."""
    import importlib

    if name not in _KNOWN_CLASSES:
        raise BundleFormatError(f"the bundle holds a {name}, which this release does not load")
    module, _, attribute = name.rpartition(".")
    cls = getattr(importlib.import_module(module), attribute, None)
    if not isinstance(cls, type) or f"{cls.__module__}.{cls.__qualname__}" != name:
        raise BundleFormatError(f"{name} is not where this release expects it; export the bundle again")
    return cls


_NUMPY_TYPES = {name: getattr(np, name) for name in
                ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool_")}


# ----------------------------------------------------------------------------- encoding


def encode(value: Any, key: str, store: ArrayStore, folder: Path | None, *,
           quantize_fasttext: bool = False) -> Any:
    """``value`` as a JSON tree; arrays go to ``store``, model files under ``folder`` (named after ``key``).

    Raises
    ------
    BundleFormatError
        When ``value`` holds an object of a class outside :func:`known_classes`
        (its path in the state is named).
    """
    return _Encoder(store, folder, quantize_fasttext).encode(value, key)


def encode_object(obj: Any, state: dict[str, Any], key: str, store: ArrayStore, folder: Path | None, *,
                  quantize_fasttext: bool = False) -> dict[str, Any]:
    """``obj`` encoded with ``state`` in place of its own attributes (e.g. only those predicting needs)."""
    encoder = _Encoder(store, folder, quantize_fasttext)
    return {"t": "object", "class": encoder.class_name(obj),
            "state": {k: encoder.encode(v, f"{key}.{k}") for k, v in state.items()}}


class _Encoder:
    def __init__(self, store: ArrayStore, folder: Path | None, quantize_fasttext: bool) -> None:
        self.store = store
        self.folder = folder
        self.quantize_fasttext = quantize_fasttext

    def encode(self, value: Any, key: str) -> Any:
        if isinstance(value, float) and not np.isfinite(value):
            return {"t": "float", "v": repr(value)}
        if isinstance(value, _PRIMITIVES):
            return value
        if isinstance(value, np.generic):
            return {"t": "scalar", "dtype": value.dtype.str, "v": value.item()}
        if isinstance(value, np.ndarray):
            return self._array(value, key)
        if isinstance(value, Path):
            return {"t": "path", "v": str(value)}
        if isinstance(value, list):
            return [self.encode(item, f"{key}.{i}") for i, item in enumerate(value)]
        if isinstance(value, tuple):
            return {"t": "tuple", "v": [self.encode(item, f"{key}.{i}") for i, item in enumerate(value)]}
        if isinstance(value, (set, frozenset)):
            return {"t": "set", "v": [self.encode(item, f"{key}.{i}") for i, item in enumerate(sorted(value))]}
        if isinstance(value, dict):
            return self._dict(value, key)
        if isinstance(value, type) and value in _NUMPY_TYPES.values():
            return {"t": "numpy_type", "v": value.__name__}
        if isinstance(value, np.dtype):
            return {"t": "dtype", "v": value.str}
        if type(value).__name__ == "DataFrame" and type(value).__module__.startswith("pandas"):
            return self._frame(value, key)
        return self._object(value, key)

    def _frame(self, frame: Any, key: str) -> dict[str, Any]:
        """A small table (fit timings, scores) column by column; text columns as JSON lists."""
        def column(values: Any, name: str) -> Any:
            array = values.to_numpy(dtype=object) if values.dtype.kind not in "biuf" else values.to_numpy()
            return self._array(array, f"{key}.{name}")

        return {"t": "frame", "columns": [str(c) for c in frame.columns], "index_name": frame.index.name,
                "index": column(frame.index, "index"),
                "data": [column(frame[c], f"column{i}") for i, c in enumerate(frame.columns)]}

    def _array(self, value: np.ndarray, key: str) -> Any:
        if value.dtype == object:
            items = value.tolist()
            if not all(isinstance(item, _PRIMITIVES) for item in value.ravel()):
                raise BundleFormatError(f"{key}: an object array of non-JSON values cannot go in a bundle")
            return {"t": "objects", "shape": list(value.shape), "v": items}
        if value.dtype.kind not in "biufc":
            raise BundleFormatError(f"{key}: arrays of dtype {value.dtype} cannot go in a bundle")
        return {"t": "array", "key": self.store.put(key, value)}

    def _dict(self, value: dict, key: str) -> Any:
        if all(isinstance(k, str) for k in value):
            return {"t": "dict", "v": {k: self.encode(v, f"{key}.{k}") for k, v in value.items()}}
        return {"t": "items", "v": [[self.encode(k, f"{key}.{i}k"), self.encode(v, f"{key}.{i}")]
                                    for i, (k, v) in enumerate(value.items())]}

    @staticmethod
    def class_name(value: Any, key: str = "the bundle") -> str:
        name = f"{type(value).__module__}.{type(value).__qualname__}"
        if name not in known_classes():
            raise BundleFormatError(f"{key}: a {name} cannot go in a bundle (not one of the known classes)")
        return name

    def _object(self, value: Any, key: str) -> Any:
        if f"{type(value).__module__}.{type(value).__qualname__}" == "fasttext.FastText._FastText":
            return self._fasttext(value, key)
        name = self.class_name(value, key)
        if name.startswith("catboost."):
            return {"t": "catboost", "class": name, "file": self._write(key, ".cbm", value.save_model)}
        from stackcat.models.torch_base import TorchClassifier

        state = dict(vars(value))
        node: dict[str, Any] = {"t": "object", "class": name}
        if isinstance(value, TorchClassifier) and "module_" in state:
            node["weights"] = self._torch_weights(value, key)
            for attribute in (*value._torch_attributes, *value._transient_attributes):
                state.pop(attribute, None)
        tensors = {name: state.pop(name) for name in getattr(value, "_tensor_attributes", ()) if name in state}
        if tensors:
            node["tensors"] = {name: self._safetensors(arrays, f"{key}.{name}") for name, arrays in tensors.items()}
        node["state"] = {k: self.encode(v, f"{key}.{k}") for k, v in state.items()}
        return node

    def _safetensors(self, arrays: dict[str, np.ndarray], key: str) -> str:
        """A dict of weight arrays (a torch module's state as NumPy) as one ``.safetensors`` file."""
        from safetensors.numpy import save_file

        return self._write(key, ".safetensors",
                           lambda path: save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path))

    def _fasttext(self, model: Any, key: str) -> dict[str, Any]:
        path = self._write(key, ".bin", model.save_model)
        if not self.quantize_fasttext:
            return {"t": "fasttext", "file": path}
        import fasttext

        copy = fasttext.load_model(str(self.folder / path))  # quantize() changes the model it is called on
        copy.quantize(input=None, qout=False, cutoff=0, retrain=False)
        (self.folder / path).unlink()
        return {"t": "fasttext", "file": self._write(key, ".ftz", copy.save_model)}

    def _torch_weights(self, estimator: Any, key: str) -> str:
        """Non-encoder weights as safetensors; a fine-tuned encoder and its tokenizer via save_pretrained."""
        from safetensors.torch import save_file

        from stackcat.features import hub
        from stackcat.models.persistence import non_encoder_state

        folder = self._path(key)
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in non_encoder_state(estimator.module_).items()},
                  str(folder / "head.safetensors"))
        if not estimator._fitted_on_cached_text():
            with hub.quiet_transformers():
                estimator.module_.encoder.save_pretrained(folder / "encoder", safe_serialization=True)
                estimator.tokenizer_.save_pretrained(folder / "tokenizer")
        return self._relative(folder)

    def _write(self, key: str, suffix: str, save: Callable[[str], Any]) -> str:
        path = self._path(key + suffix)
        save(str(path))
        return self._relative(path)

    def _path(self, key: str) -> Path:
        if self.folder is None:
            raise BundleFormatError(f"{key}: a model file needs a bundle folder")
        (self.folder / "files").mkdir(exist_ok=True)
        return self.folder / "files" / key

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.folder).as_posix()


# ----------------------------------------------------------------------------- decoding


def decode(node: Any, store: ArrayStore, folder: Path | None) -> Any:
    """Rebuild what :func:`encode` wrote (objects only of :func:`known_classes`)."""
    return _Decoder(store, folder).decode(node)


class _Decoder:
    def __init__(self, store: ArrayStore, folder: Path | None) -> None:
        self.store = store
        self.folder = folder

    def decode(self, node: Any) -> Any:
        if isinstance(node, _PRIMITIVES):
            return node
        if isinstance(node, list):
            return [self.decode(item) for item in node]
        if not isinstance(node, dict) or "t" not in node:
            raise BundleFormatError(f"malformed node in the bundle's state: {str(node)[:80]}")
        kind = node["t"]
        handler = getattr(self, f"_decode_{kind}", None)
        if handler is None:
            raise BundleFormatError(f"unknown node kind {kind!r} in the bundle's state")
        return handler(node)

    def _decode_float(self, node: dict) -> float:
        return float(node["v"])

    def _decode_scalar(self, node: dict) -> Any:
        return np.dtype(node["dtype"]).type(node["v"])

    def _decode_array(self, node: dict) -> np.ndarray:
        return self.store.get(node["key"])

    def _decode_objects(self, node: dict) -> np.ndarray:
        array = np.empty(tuple(node["shape"]), dtype=object)
        flat = np.asarray(node["v"], dtype=object).reshape(-1) if array.ndim > 1 else node["v"]
        array.reshape(-1)[:] = flat
        return array

    def _decode_path(self, node: dict) -> Path:
        return Path(node["v"])

    def _decode_tuple(self, node: dict) -> tuple:
        return tuple(self.decode(item) for item in node["v"])

    def _decode_set(self, node: dict) -> set:
        return {self.decode(item) for item in node["v"]}

    def _decode_dict(self, node: dict) -> dict:
        return {k: self.decode(v) for k, v in node["v"].items()}

    def _decode_items(self, node: dict) -> dict:
        return {self.decode(k): self.decode(v) for k, v in node["v"]}

    def _decode_frame(self, node: dict) -> Any:
        import pandas as pd

        index = pd.Index(self.decode(node["index"]), name=node["index_name"])
        return pd.DataFrame({name: self.decode(values) for name, values in zip(node["columns"], node["data"],
                                                                                strict=True)}, index=index)

    def _decode_numpy_type(self, node: dict) -> type:
        if node["v"] not in _NUMPY_TYPES:
            raise BundleFormatError(f"unknown numpy type {node['v']!r} in the bundle's state")
        return _NUMPY_TYPES[node["v"]]

    def _decode_dtype(self, node: dict) -> np.dtype:
        return np.dtype(node["v"])

    def _decode_fasttext(self, node: dict) -> Any:
        import fasttext

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fasttext.load_model(str(self._file(node["file"])))

    def _decode_catboost(self, node: dict) -> Any:
        model = self._class(node["class"])()
        model.load_model(str(self._file(node["file"])), format="cbm")
        return model

    def _decode_object(self, node: dict) -> Any:
        cls = self._class(node["class"])
        obj = cls.__new__(cls)
        obj.__dict__.update(_param_defaults(cls))  # params added since the bundle was written
        obj.__dict__.update({k: self.decode(v) for k, v in node["state"].items()})
        for name, relative in node.get("tensors", {}).items():
            from safetensors.numpy import load_file

            obj.__dict__[name] = load_file(str(self._file(relative)))
        if "weights" in node:
            _load_torch_weights(obj, self._file(node["weights"]))
        return obj

    def _class(self, name: str) -> type:
        return known_class(name)

    def _file(self, relative: str) -> Path:
        if self.folder is None:
            raise BundleFormatError("a model file needs a bundle folder")
        path = (self.folder / relative).resolve()
        if not path.is_relative_to(self.folder.resolve()):
            raise BundleFormatError(f"{relative}: outside the bundle")
        return path


def _param_defaults(cls: type) -> dict[str, Any]:
    """The default of every ``__init__`` parameter of an estimator class (none for other classes).

    A bundle written before a parameter existed has no value for it: the
    default is what the estimator did then.
    """
    import inspect

    if not hasattr(cls, "_get_param_names"):
        return {}
    parameters = inspect.signature(cls.__init__).parameters
    return {name: parameters[name].default for name in cls._get_param_names()
            if parameters[name].default is not inspect.Parameter.empty}


def _load_torch_weights(estimator: Any, folder: Path) -> None:
    """Build ``module_`` the way the estimator's fit did, then load the safetensors weights into it."""
    from safetensors.torch import load_file

    inputs = estimator._text_inputs(fitting=False)
    encoder = inputs.load(folder)
    vars(estimator).update(inputs.fitted)
    estimator.module_ = estimator._build_module(encoder)
    path = folder / "head.safetensors"
    missing, unexpected = estimator.module_.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise BundleFormatError(f"{path} does not fit the model: missing {missing}, unexpected {unexpected}")

