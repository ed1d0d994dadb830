"""A small byte-level BPE tokenizer trained on the corpus, loadable with ``AutoTokenizer``."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Byte-level means every string round-trips (``decode(encode(s)) == s``) and nothing is
    unknown. ``<|endoftext|>`` serves as eos, bos and unk; ``<|pad|>`` pads.

    Parameters
    ----------
    texts : Iterable[str]
        Training text, consumed once; the same texts in the same order give the same
        tokenizer.
    vocab_size : int
        Target vocabulary size, special tokens and the 256 byte symbols included.

    Returns
    -------
    PreTrainedTokenizerFast
        Saves with ``save_pretrained`` and reloads with ``AutoTokenizer.from_pretrained``.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size must cover 256 bytes + 2 special tokens, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: a leading space would be added on encode and survive decode.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN,
                                   bos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   clean_up_tokenization_spaces=False)
