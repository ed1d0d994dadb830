"""Language-model batching: token blocks from text rows, and a unigram baseline.

Rows are a ``datasets.Dataset`` (simulation) or a list of row dicts
(:func:`fedmoe.data.files.read_text_rows`, a device's own file): the same texts give the same
blocks, and nothing here imports ``datasets``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    import datasets

    Rows = datasets.Dataset | Sequence[Mapping[str, Any]]

_TOKENIZE_BATCH = 256


def text_batches(rows: Rows, batch_size: int = _TOKENIZE_BATCH) -> Iterator[list[str]]:
    """The ``text`` of ``rows``, ``batch_size`` rows at a time, in row order."""
    if hasattr(rows, "select_columns"):  # a datasets.Dataset: read its one column only
        for batch in rows.select_columns(["text"]).iter(batch_size=batch_size):
            yield batch["text"]
        return
    for start in range(0, len(rows), batch_size):
        yield [row["text"] for row in rows[start:start + batch_size]]


def tokenize_blocks(
    ds: Rows,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_blocks: int | None = None,
) -> torch.Tensor:
    """Tokenize ``ds["text"]`` into contiguous blocks for causal LM training.

    Each row is tokenized without special tokens and followed by ``eos_token_id`` (so the
    model learns where documents end); the rows are concatenated in order and cut into
    full blocks, dropping the remainder.

    Parameters
    ----------
    ds : datasets.Dataset or Sequence[Mapping]
        Rows with a ``text`` field.
    tokenizer : PreTrainedTokenizerBase
        Must define ``eos_token_id``.
    block_size : int
        Tokens per block.
    max_blocks : int | None
        Stop after this many blocks (rows past them are not tokenized).

    Returns
    -------
    torch.Tensor
        ``torch.long`` of shape ``(num_blocks, block_size)``; ``(0, block_size)`` when the
        text is shorter than one block.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenize_blocks needs a tokenizer with an eos_token_id")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    budget = None if max_blocks is None else max_blocks * block_size
    ids: list[int] = []
    for texts in text_batches(ds):
        encoded = tokenizer(texts, add_special_tokens=False, verbose=False)
        for row in encoded["input_ids"]:
            ids.extend(row)
            ids.append(tokenizer.eos_token_id)
        if budget is not None and len(ids) >= budget:
            break
    num_blocks = len(ids) // block_size
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    flat = torch.tensor(ids[: num_blocks * block_size], dtype=torch.long)  # (N * T,)
    return flat.view(num_blocks, block_size)  # (N, T)


def unigram_perplexity(train_blocks: torch.Tensor, eval_blocks: torch.Tensor,
                       vocab_size: int) -> float:
    """Perplexity on ``eval_blocks`` of an add-one smoothed unigram model of ``train_blocks``.

    ``p(t) = (count(t) + 1) / (N + V)`` with ``N`` train tokens and ``V = vocab_size``;
    a trained LM should beat this baseline, which knows token frequencies only.

    Returns
    -------
    float
        ``exp(-mean log p(t))`` over all eval tokens.
    """
    counts = np.bincount(train_blocks.reshape(-1).numpy(), minlength=vocab_size)  # (V,)
    if len(counts) > vocab_size:
        raise ValueError(f"train tokens reach id {len(counts) - 1} >= vocab_size {vocab_size}")
    log_probs = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)  # (V,)
    eval_ids = eval_blocks.reshape(-1).numpy()
    if eval_ids.size == 0:
        raise ValueError("unigram_perplexity needs at least one eval token")
    return float(np.exp(-log_probs[eval_ids].mean()))
