"""A tiny random-init BERT checkpoint folder for tests (nothing is downloaded).

:func:`build_tiny_bert` trains a WordPiece tokenizer on the given texts with
``tokenizers`` and saves it, with a 2-layer BERT of hidden size 32, through
``save_pretrained``: the folder works as ``model_name=<folder>``.
:class:`CountingLoader` counts how often each text goes through such an encoder.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

WORDS = ("red blue green black white cotton denim leather wool silk shirt jeans wallet shoes "
         "watch bag dress scarf running casual formal men women kids summer winter light dark "
         "рубашка джинсы кошелёк туфли часы сумка платье шарф").split()


def build_tiny_bert(folder: str | Path, texts: Iterable[str] = (), *, vocab_size: int = 300,
                    max_positions: int = 64, seed: int = 0) -> Path:
    """Write a tiny BERT (2 layers, hidden 32, 2 heads, intermediate 64) + tokenizer to ``folder``."""
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = Path(folder)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    corpus = list(texts) + [" ".join(WORDS)]
    tokenizer.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                                    special_tokens=SPECIAL_TOKENS))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_positions,
    ).save_pretrained(folder)

    config = BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=max_positions, pad_token_id=0)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder


class CountingLoader:
    """Wraps a text-encoder loader (``load_text_encoder``): counts loads, and how often each
    distinct token sequence goes through a loaded encoder's forward pass.

    Use: ``monkeypatch.setattr(text_states, "load_text_encoder", CountingLoader(original))``.
    """

    def __init__(self, load: Callable[[str], tuple[Any, Any]]):
        self.load = load
        self.loads = 0
        self.encoded: Counter[tuple[int, ...]] = Counter()

    def __call__(self, model_name: str) -> tuple[Any, Any]:
        encoder, tokenizer = self.load(model_name)
        self.loads += 1
        encoder.register_forward_pre_hook(self._count, with_kwargs=True)
        return encoder, tokenizer

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        for ids, keep in zip(kwargs["input_ids"], kwargs["attention_mask"].bool()):
            self.encoded[tuple(ids[keep].tolist())] += 1

    @property
    def max_encodings_per_text(self) -> int:
        return max(self.encoded.values(), default=0)
