"""Build the data of a run from the ``data`` config group (``conf/data/*.yaml``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets

from fedmoe.config import DATA_NAMES
from fedmoe.data.corpus import build_corpus
from fedmoe.data.files import DEFAULT_DOMAIN, SPLITS, split_of
from fedmoe.data.hf import load_text_dataset


def split_by_hash(ds: datasets.Dataset, validation: float = 0.1,
                  test: float = 0.1) -> datasets.DatasetDict:
    """Split rows into train/validation/test by a sha256 hash of their text
    (:func:`fedmoe.data.files.split_of`).

    Equal texts always share a split, so duplicates never leak from train into evaluation;
    the split does not depend on row order.
    """
    labels = [split_of(text, validation, test) for text in ds["text"]]
    return datasets.DatasetDict({
        split: ds.select([i for i, label in enumerate(labels) if label == split])
        for split in SPLITS})


def split_rows_by_hash(ds: datasets.Dataset, where: Any) -> datasets.DatasetDict:
    """:func:`split_by_hash`, or an error naming ``data.path`` (``where``) when a split is
    left empty."""
    splits = split_by_hash(ds)
    for split in SPLITS:
        if len(splits[split]) == 0:
            raise ValueError(f"data.path={where!r}: its {len(ds)} row(s) leave the {split} "
                             "split empty (rows split 80/10/10 by a hash of their text); add "
                             "rows")
    return splits


def first_rows(ds: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first ``limit`` rows (``data.max_rows_per_source``; ``None``: all)."""
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def load_data(cfg: Mapping[str, Any]) -> datasets.DatasetDict:
    """The train/validation/test text of a run, chosen by ``cfg.name`` (``data.name``).

    Parameters
    ----------
    cfg : Mapping
        The ``data`` config: ``embedded`` uses ``max_mb_per_domain``, ``chunk_chars`` and
        optional ``seed``/``cache_dir``/``domains``; ``hf`` uses ``path``, ``split``,
        ``text_field``, ``domain_field`` and optional ``data_files``, or ``sources``
        (domain -> hub id or file, each source one domain) and ``max_rows_per_source``.

    Returns
    -------
    datasets.DatasetDict
        Splits ``train``, ``validation``, ``test``, each with ``text`` and ``domain``.
    """
    name = cfg.get("name")
    if name == "embedded":
        return build_corpus(max_mb_per_domain=cfg.get("max_mb_per_domain", 2.0),
                            chunk_chars=cfg.get("chunk_chars", 2000), seed=cfg.get("seed", 0),
                            cache_dir=cfg.get("cache_dir"), domains=cfg.get("domains"))
    if name == "hf":
        sources = cfg.get("sources") or {}
        # One domain per source (a FlowerTune-style mix): with partition=natural each group
        # of clients gets one domain.
        parts = [_load_source(cfg, path, domain) for domain, path in sources.items()] \
            or [_load_source(cfg, cfg["path"], None)]
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        return split_rows_by_hash(ds, cfg.get("path") or sorted(sources.values()))
    raise ValueError(f"Unknown data.name {name!r}; expected one of {list(DATA_NAMES)}")


def _load_source(cfg: Mapping[str, Any], path: str, domain: str | None) -> datasets.Dataset:
    """One hub id or local file of an ``hf`` config; ``domain`` labels every row."""
    ds = load_text_dataset(path, split=cfg.get("split", "train"),
                           text_field=cfg.get("text_field"),
                           domain_field=None if domain else cfg.get("domain_field"),
                           data_files=None if domain else cfg.get("data_files"),
                           default_domain=domain or DEFAULT_DOMAIN)
    return first_rows(ds, cfg.get("max_rows_per_source"))
