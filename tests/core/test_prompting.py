"""Plain questions (eas/model/prompting.py, `find_marker`): the tokenizer's control tokens in a question are
found, and a character the tokenizer cannot spell is not mistaken for one."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from eas.model.prompting import find_marker, special_tokens


def _tokenizer_without_byte_fallback() -> PreTrainedTokenizerFast:
    """A BPE that maps every character outside its vocabulary to `<unk>`, as tokenizers without byte
    fallback do."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["what colour is the shape", "a red circle"] * 50,
                            trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"],
                                                show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_characters_outside_the_vocabulary_are_text_and_control_tokens_are_not() -> None:
    tokenizer = _tokenizer_without_byte_fallback()
    for question in ("what colour is the shape?", "qué color", "what shape 🙂"):
        ids = tokenizer.backend_tokenizer.encode(question, add_special_tokens=False).ids
        assert tokenizer.unk_token_id in ids  # the case itself: the tokenizer spells part of it as <unk>
        assert find_marker(tokenizer, question) is None
    assert "<unk>" not in special_tokens(tokenizer)
    for token in ("<s>", "</s>"):
        assert find_marker(tokenizer, f"is {token} it?") == ("a special token of this model's tokenizer", token)
