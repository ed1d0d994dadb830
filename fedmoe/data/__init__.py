"""Data for fedmoe: the embedded corpus, user datasets, client partitions, LM blocks.

The main path: `load_data` (config) -> `client_datasets` (partition across clients) ->
`tokenize_blocks` (LM batches), or `client_partitions` (config -> clients; a hub dataset
through flwr-datasets' `FederatedDataset`), with `train_tokenizer` for a corpus-fitted
vocabulary and `unigram_perplexity` as the baseline to beat. A device reads its own file with
`read_text_rows` and `split_rows` instead (no ``datasets``).

Names are imported on first use: the corpus, partitions and the ``hf`` loader need
``datasets`` (the ``sim`` extra), which the slim device install lacks; a device's own file
and the token blocks need only the base package.
"""

from importlib import import_module

from fedmoe.extras import extra_needed

# Public name -> the module of fedmoe.data that defines it.
_MODULE_OF = {
    "DOMAINS": "corpus", "build_corpus": "corpus", "chunk_text": "corpus",
    "SPLITS": "files", "format_alpaca": "files", "read_text_rows": "files",
    "split_rows": "files",
    "load_text_dataset": "hf",
    "tokenize_blocks": "lm", "unigram_perplexity": "lm",
    "load_data": "load", "split_by_hash": "load",
    "SCHEMES": "partition", "ClientData": "partition", "client_datasets": "partition",
    "partition_dataset": "partition",
    "client_partitions": "federated", "federated_client_datasets": "federated",
    "train_tokenizer": "tokenizer",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fedmoe.data' has no attribute {name!r}")
    with extra_needed(f"fedmoe.data.{name}"):
        module = import_module(f"fedmoe.data.{_MODULE_OF[name]}")
    value = globals()[name] = getattr(module, name)
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])
