"""The clients' data of a run: a hub dataset through flwr-datasets' ``FederatedDataset``.

``data.path`` a hub dataset id (``data=hf``, or a FlowerTune preset such as
``data=alpaca_gpt4``) is loaded, prepared and partitioned the way Flower's own examples do
it: ``FederatedDataset(dataset=<id>, partitioners={split: partitioner}, preprocessor=...)``
and ``load_partition(client, split)``. The partitioners are those ``data.partition`` names
(:func:`fedmoe.data.partition.partitioner`: ``IidPartitioner``, ``DirichletPartitioner``,
``NaturalIdPartitioner`` over one domain per client), and the preprocessor does what
:func:`fedmoe.data.load_data` does to a local file (text and domain columns, the first
``data.max_rows_per_source`` rows, the 80/10/10 split by a hash of the text, the scheme's
preparation), so a hub dataset and a local copy of it give the same clients. Any other
``datasets.load_dataset`` path works too: a builder with files (``data.path=json
data.data_files=<file>``) or a local directory. Local files and ``data.sources`` mixes
are loaded by :func:`fedmoe.data.load_data` and partitioned with the same partitioners.

Task code: flwr-datasets is a data library; nothing here imports flwr.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import datasets
from flwr_datasets import FederatedDataset

from fedmoe.data.hf import text_dataset
from fedmoe.data.load import first_rows, load_data, split_rows_by_hash
from fedmoe.data.partition import (
    ClientData,
    check_partition,
    client_datasets,
    clients_of,
    matched_validation,
    partitioner,
    partitions,
    prepared,
)


def client_partitions(cfg: Mapping[str, Any], num_clients: int) -> list[ClientData]:
    """Client ``i``'s train and validation data at index ``i``, from the ``data`` config."""
    if is_hub_dataset(cfg):
        return federated_client_datasets(cfg, num_clients)
    return client_datasets(load_data(cfg), num_clients, cfg["partition"], cfg.get("alpha", 0.5),
                           cfg.get("seed", 0))


def is_hub_dataset(cfg: Mapping[str, Any]) -> bool:
    """``data.path`` names a dataset ``datasets.load_dataset`` finds (a hub id, a builder with
    ``data.data_files``), not a local file or folder, and no ``data.sources`` mix."""
    path = cfg.get("path")
    return cfg.get("name") == "hf" and not cfg.get("sources") and bool(path) \
        and not Path(str(path)).expanduser().exists()


def federated_client_datasets(cfg: Mapping[str, Any], num_clients: int) -> list[ClientData]:
    """The clients of ``data.path`` partitioned by a ``FederatedDataset``.

    Validation rows are partitioned like the train rows, except under ``dirichlet``: each
    client samples the validation split in its train partition's domain proportions
    (:func:`fedmoe.data.partition.matched_validation`), as for local data.
    """
    scheme, alpha, seed = cfg["partition"], cfg.get("alpha", 0.5), cfg.get("seed", 0)
    splits = ("train",) if scheme == "dirichlet" else ("train", "validation")
    parts = {split: partitioner(scheme, num_clients, alpha, seed) for split in splits}
    fds = FederatedDataset(
        dataset=str(cfg["path"]), partitioners=parts, shuffle=False,  # each scheme shuffles
        preprocessor=partial(_prepare, cfg, num_clients), **_load_kwargs(cfg))

    def part_of(split: str) -> list[datasets.Dataset]:
        return partitions(parts[split], lambda i: fds.load_partition(i, split), scheme,
                          num_clients, alpha)

    train = part_of("train")
    validation = matched_validation(fds.load_split("validation"), train, seed) \
        if scheme == "dirichlet" else part_of("validation")
    return clients_of(train, validation)


def _load_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    files = cfg.get("data_files")
    if isinstance(files, Mapping):
        files = dict(files)
    return {"data_files": files} if files else {}


def _prepare(cfg: Mapping[str, Any], num_clients: int,
             loaded: datasets.DatasetDict) -> datasets.DatasetDict:
    """``FederatedDataset``'s preprocessor: ``data.split`` as fedmoe's train, validation and
    test splits, each ready for the scheme's partitioner."""
    split, path = cfg.get("split", "train"), str(cfg["path"])
    if split not in loaded:
        raise ValueError(f"data.split={split!r}: {path!r} has the splits {sorted(loaded)}")
    rows = text_dataset(loaded[split], path, cfg.get("text_field"), cfg.get("domain_field"))
    splits = split_rows_by_hash(first_rows(rows, cfg.get("max_rows_per_source")), path)
    scheme, seed = cfg["partition"], cfg.get("seed", 0)
    check_partition(splits["train"], num_clients, scheme)
    return datasets.DatasetDict({
        name: prepared(ds, scheme, num_clients, seed) if name != "test" else ds
        for name, ds in splits.items()})
