"""The corpus-trained byte-level BPE tokenizer."""

from __future__ import annotations

from transformers import AutoTokenizer

from fedmoe.data import train_tokenizer


def test_save_reload_round_trip(tiny_tokenizer, small_corpus, tmp_path):
    # Prepare
    text = small_corpus["test"]["text"][0] + "\nnon-ASCII: é ü — 😀  \t end"
    tiny_tokenizer.save_pretrained(tmp_path)

    # Execute
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = reloaded(text, add_special_tokens=False)["input_ids"]

    # Assert
    assert reloaded.decode(ids) == text
    assert ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(reloaded) == 512
    assert reloaded.eos_token == reloaded.bos_token == reloaded.unk_token == "<|endoftext|>"
    assert reloaded.pad_token == "<|pad|>"
    assert reloaded.pad_token_id != reloaded.eos_token_id


def test_training_is_deterministic_and_compresses(small_corpus):
    # Prepare
    texts = small_corpus["train"]["text"][:100]

    # Execute
    first = train_tokenizer(texts, vocab_size=400)
    second = train_tokenizer(texts, vocab_size=400)
    sample = texts[0]

    # Assert: merges learned (fewer tokens than bytes), identical vocabularies
    assert first.get_vocab() == second.get_vocab()
    assert len(first(sample)["input_ids"]) < len(sample.encode("utf-8")) * 0.8
