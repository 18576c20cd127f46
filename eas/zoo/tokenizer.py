"""A byte-level BPE tokenizer trained in-process (milliseconds), so no tokenizer file is ever fetched."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# The order fixes the ids: <pad>=0, <s>=1, </s>=2, <image>=3; model configs rely on them.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]
PAD_ID, BOS_ID, EOS_ID, IMAGE_TOKEN_ID = 0, 1, 2, 3


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512,
                    extra: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on `corpus`; left padding, as batched generation needs.

    `extra` names further special tokens (attribute -> token, e.g. {"boi_token": "<start_of_image>"}); they
    take the ids after the four fixed ones, in order, and become tokenizer attributes (`tok.boi_token`,
    `tok.boi_token_id`), which several processors read. An "image_token" entry replaces "<image>"'s role."""
    extra = dict(extra or {})
    named = {"image_token": "<image>", **extra}
    specials = SPECIAL_TOKENS + [t for t in extra.values() if t not in SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=named,
        padding_side="left",
    )
    return hf_tok
