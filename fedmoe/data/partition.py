"""Partition a text dataset across federated clients with flwr-datasets partitioners.

Schemes (``data.partition``):

- ``natural``: one domain per client. Client ``i`` gets domain ``sorted_domains[i % D]``,
  and a domain's rows are split IID among its clients. With fewer clients than domains the
  last domains (in sorted order) are unused.
- ``dirichlet``: each domain's rows are spread over the clients with proportions drawn from
  Dirichlet(alpha); small alpha -> few domains per client.
- ``iid``: a seeded shuffle, then equal contiguous shards.

This module is task code: it uses flwr-datasets (a data library), never flwr itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

from fedmoe.config import PARTITIONS as SCHEMES

_CLIENT_COLUMN = "client_id"


@dataclass
class ClientData:
    """One client's data: its train partition and a held-out set with the same domain mix."""

    client_id: int
    train: datasets.Dataset
    validation: datasets.Dataset
    domains: list[str] = field(default_factory=list)

    @property
    def domain_shares(self) -> dict[str, float]:
        """Fraction of train rows per domain (sorted by domain)."""
        return _shares(self.train["domain"])


def _shares(labels: list[str]) -> dict[str, float]:
    names, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    return {str(n): float(c) / max(len(labels), 1) for n, c in zip(names, counts, strict=True)}


def check_partition(ds: datasets.Dataset, num_clients: int, scheme: str,
                    by: str = "domain") -> None:
    """``ds`` can be split among ``num_clients`` by ``scheme``; else an error naming the key."""
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown data.partition {scheme!r}; expected one of {list(SCHEMES)}")
    if num_clients < 1:
        raise ValueError(f"data.num_clients must be >= 1, got {num_clients}")
    if len(ds) < num_clients:
        raise ValueError(f"Cannot split {len(ds)} rows among data.num_clients={num_clients}")
    if scheme != "iid" and by not in ds.column_names:
        raise ValueError(f"Partition column {by!r} not in dataset columns {ds.column_names}")


def natural_client_ids(ds: datasets.Dataset, num_clients: int, seed: int = 0,
                       by: str = "domain") -> np.ndarray:
    """Client id of every row under the ``natural`` scheme (-1: domain unused).

    Returns
    -------
    np.ndarray
        Shape ``(len(ds),)``, int64. Rows of domain ``sorted_domains[d]`` go, shuffled with
        ``seed``, in near-equal parts to clients ``d, d + D, d + 2D, ...``.
    """
    labels = np.asarray(ds[by], dtype=object).astype(str)
    domains = sorted(set(labels.tolist()))
    client_ids = np.full(len(labels), -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for d, domain in enumerate(domains):
        clients = list(range(d, num_clients, len(domains)))
        if not clients:
            continue  # fewer clients than domains: this domain is unused
        rows = rng.permutation(np.flatnonzero(labels == domain))
        if clients and len(rows) < len(clients):
            raise ValueError(f"Domain {domain!r} has {len(rows)} rows for {len(clients)} "
                             f"clients; lower data.num_clients (now {num_clients})")
        for client, part in zip(clients, np.array_split(rows, len(clients)), strict=False):
            client_ids[part] = client
    return client_ids


def prepared(ds: datasets.Dataset, scheme: str, num_clients: int, seed: int = 0,
             by: str = "domain") -> datasets.Dataset:
    """The rows as the scheme's partitioner reads them: ``natural`` adds each row's client
    (:func:`natural_client_ids`; rows of unused domains dropped), ``iid`` shuffles with
    ``seed`` (``IidPartitioner`` takes contiguous shards, which would follow the row order),
    ``dirichlet`` takes them as they are."""
    if scheme == "natural":
        client_ids = natural_client_ids(ds, num_clients, seed, by)
        keep = np.flatnonzero(client_ids >= 0)
        return ds.select(keep).add_column(_CLIENT_COLUMN, client_ids[keep].tolist())
    if scheme == "iid":
        return ds.shuffle(seed=seed).flatten_indices()
    return ds


def partitioner(scheme: str, num_clients: int, alpha: float = 0.5, seed: int = 0,
                by: str = "domain", rows: int | None = None) -> Partitioner:
    """The flwr-datasets partitioner of ``scheme`` (``data.partition``), before it has data.

    ``rows``: the rows it will get, known or not (``None``: a hub dataset not yet loaded).
    ``dirichlet`` then asks every client for 2% of a fair share, at most flwr's default of
    10 rows: for small alpha that floor fails often (a client draws ~0 of every domain), and
    flwr gives up after 10 draws.
    """
    if scheme == "natural":
        return NaturalIdPartitioner(partition_by=_CLIENT_COLUMN)
    if scheme == "iid":
        return IidPartitioner(num_partitions=num_clients)
    min_size = 10 if rows is None else max(1, min(10, rows // (50 * num_clients)))
    return DirichletPartitioner(num_partitions=num_clients, partition_by=by, alpha=alpha,
                                min_partition_size=min_size, seed=seed)


def partitions(part: Partitioner, load: Callable[[int], datasets.Dataset], scheme: str,
               num_clients: int, alpha: float = 0.5) -> list[datasets.Dataset]:
    """Client ``i``'s rows at index ``i``: ``load(partition_id)`` of ``part`` (directly, or
    through a ``FederatedDataset``), natural partitions in client order."""
    if scheme == "dirichlet":
        try:
            with warnings.catch_warnings():
                # flwr warns at every resampling; the failure, if any, is raised below.
                warnings.simplefilter("ignore", UserWarning)
                return [load(i) for i in range(num_clients)]
        except ValueError as err:
            raise ValueError(f"Dirichlet partition failed for data.alpha={alpha}, "
                             f"data.num_clients={num_clients}: no draw gave every client its "
                             "minimum of rows; raise data.alpha or lower data.num_clients") \
                from err
    if scheme == "iid":
        return [load(i) for i in range(num_clients)]
    load(0)  # gives the partitioner its data
    # num_partitions builds the partition id -> natural id map (the property alone does not).
    assert part.num_partitions == num_clients
    by_client = {cid: pid for pid, cid in part.partition_id_to_natural_id.items()}
    return [load(by_client[c]).remove_columns(_CLIENT_COLUMN) for c in range(num_clients)]


def partition_dataset(
    ds: datasets.Dataset,
    num_clients: int,
    scheme: str,
    alpha: float = 0.5,
    seed: int = 0,
    by: str = "domain",
) -> list[datasets.Dataset]:
    """Split ``ds`` into ``num_clients`` client datasets.

    Parameters
    ----------
    ds : datasets.Dataset
        Rows with a ``by`` column (for ``natural`` and ``dirichlet``).
    num_clients : int
        Number of clients (``data.num_clients``).
    scheme : str
        ``natural``, ``dirichlet`` or ``iid`` (``data.partition``), see the module doc.
    alpha : float
        Dirichlet concentration (``data.alpha``); only for ``dirichlet``.
    seed : int
        Seed of every random choice; the same arguments give the same partitions.
    by : str
        Column holding the domain label.

    Returns
    -------
    list[datasets.Dataset]
        Client ``i``'s rows at index ``i``. The sizes sum to ``len(ds)``, except under
        ``natural`` with fewer clients than domains (unused domains are dropped).
    """
    check_partition(ds, num_clients, scheme, by)
    part = partitioner(scheme, num_clients, alpha, seed, by, rows=len(ds))
    part.dataset = prepared(ds, scheme, num_clients, seed, by)
    return partitions(part, part.load_partition, scheme, num_clients, alpha)


def _matched_validation(pool: datasets.Dataset, train: datasets.Dataset, size: int,
                        rng: np.random.Generator) -> datasets.Dataset:
    """Sample ``size`` rows of ``pool`` with the domain proportions of ``train``."""
    labels = np.asarray(pool["domain"], dtype=object).astype(str)
    picked = []
    for domain, share in _shares(train["domain"]).items():
        candidates = np.flatnonzero(labels == domain)
        count = min(len(candidates), max(1, round(share * size)))
        picked.append(rng.choice(candidates, size=count, replace=False))
    return pool.select(np.sort(np.concatenate(picked)) if picked else [])


def client_datasets(
    dd: datasets.DatasetDict,
    num_clients: int,
    scheme: str,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[ClientData]:
    """Partition ``dd["train"]`` and give each client a validation set of its domain mix.

    Validation rows come from ``dd["validation"]``: under ``natural`` a domain's rows are
    split among its clients, under ``iid`` they are split IID; under ``dirichlet`` each
    client samples (without replacement, seeded) a share of the validation split equal to
    its share of the train rows, with the domain proportions of its train partition.
    Clients may then share validation rows, never train rows.
    """
    train_parts = partition_dataset(dd["train"], num_clients, scheme, alpha, seed)
    if scheme == "dirichlet":
        val_parts = matched_validation(dd["validation"], train_parts, seed)
    else:
        val_parts = partition_dataset(dd["validation"], num_clients, scheme, alpha, seed)
    return clients_of(train_parts, val_parts)


def matched_validation(pool: datasets.Dataset, train_parts: list[datasets.Dataset],
                       seed: int = 0) -> list[datasets.Dataset]:
    """Per client, a sample of ``pool`` (seeded, without replacement) of its share of the
    train rows, with the domain proportions of its train partition."""
    total = sum(len(part) for part in train_parts)
    return [_matched_validation(pool, part, max(1, len(pool) * len(part) // total),
                                np.random.default_rng([seed, client]))
            for client, part in enumerate(train_parts)]


def clients_of(train_parts: list[datasets.Dataset],
               val_parts: list[datasets.Dataset]) -> list[ClientData]:
    """Client ``i``'s :class:`ClientData` from the ``i``-th train and validation parts."""
    return [ClientData(client_id=i, train=train, validation=val,
                       domains=sorted(set(train["domain"])))
            for i, (train, val) in enumerate(zip(train_parts, val_parts, strict=True))]
