"""Data for fedmoe: the embedded corpus, user datasets, client partitions, LM blocks.

The main path: `load_data` (config) -> `client_datasets` (partition across clients) ->
`tokenize_blocks` (LM batches), with `train_tokenizer` for a corpus-fitted vocabulary and
`unigram_perplexity` as the baseline to beat.
"""

from fedmoe.data.corpus import DOMAINS, build_corpus, chunk_text, corpus_stats
from fedmoe.data.hf import format_alpaca, load_text_dataset
from fedmoe.data.lm import tokenize_blocks, unigram_perplexity
from fedmoe.data.load import load_data, split_by_hash
from fedmoe.data.partition import SCHEMES, ClientData, client_datasets, partition_dataset
from fedmoe.data.tokenizer import train_tokenizer

__all__ = [
    "DOMAINS",
    "SCHEMES",
    "ClientData",
    "build_corpus",
    "chunk_text",
    "client_datasets",
    "corpus_stats",
    "format_alpaca",
    "load_data",
    "load_text_dataset",
    "partition_dataset",
    "split_by_hash",
    "tokenize_blocks",
    "train_tokenizer",
    "unigram_perplexity",
]
