"""Token blocks for causal LM training and the unigram baseline."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from fedmoe.data import tokenize_blocks, unigram_perplexity


def test_blocks_shape_eos_and_order(tiny_tokenizer):
    # Prepare
    ds = datasets.Dataset.from_dict({"text": ["hello world", "second row of text"]})
    expected = []
    for text in ds["text"]:
        expected += tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        expected.append(tiny_tokenizer.eos_token_id)

    # Execute
    blocks = tokenize_blocks(ds, tiny_tokenizer, block_size=4)

    # Assert: full blocks only, in order, eos after each row
    assert blocks.dtype == torch.long
    assert blocks.shape == (len(expected) // 4, 4)
    assert blocks.flatten().tolist() == expected[: blocks.numel()]


def test_blocks_are_deterministic_and_capped(small_corpus, tiny_tokenizer):
    # Prepare
    ds = small_corpus["validation"]

    # Execute
    first = tokenize_blocks(ds, tiny_tokenizer, block_size=64)
    second = tokenize_blocks(ds, tiny_tokenizer, block_size=64)
    capped = tokenize_blocks(ds, tiny_tokenizer, block_size=64, max_blocks=10)

    # Assert
    assert first.shape[0] > 10
    assert torch.equal(first, second)
    assert torch.equal(capped, first[:10])


def test_short_text_gives_no_blocks(tiny_tokenizer):
    # Execute
    blocks = tokenize_blocks(datasets.Dataset.from_dict({"text": ["hi"]}), tiny_tokenizer, 128)

    # Assert
    assert blocks.shape == (0, 128)


def test_unigram_perplexity_hand_computed():
    # Prepare: train counts (2, 1, 0) over V=3 -> p = (3/6, 2/6, 1/6)
    train = torch.tensor([[0, 0, 1]])
    evals = torch.tensor([[0, 1]])

    # Execute
    ppl = unigram_perplexity(train, evals, vocab_size=3)

    # Assert: exp(-(log 1/2 + log 1/3) / 2) = sqrt(6)
    assert ppl == pytest.approx(math.sqrt(6))


def test_unigram_perplexity_of_uniform_model_is_vocab_size():
    # Execute: no train tokens -> add-one gives the uniform distribution
    ppl = unigram_perplexity(torch.zeros((0, 4), dtype=torch.long), torch.tensor([[1, 2]]), 50)

    # Assert
    assert ppl == pytest.approx(50.0)
