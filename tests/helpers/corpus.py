"""Sizes of a built corpus, read by the corpus tests."""

from __future__ import annotations

import datasets


def corpus_stats(dd: datasets.DatasetDict) -> dict[str, dict[str, dict[str, float]]]:
    """Size of each domain in each split.

    Returns
    -------
    dict
        ``{split: {domain: {"mb": MB of UTF-8 text, "chunks": rows, "sources": sources}}}``.
    """
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for split, ds in dd.items():
        per_domain: dict[str, dict] = {}
        for text, domain, source in zip(ds["text"], ds["domain"], _sources(ds), strict=True):
            entry = per_domain.setdefault(domain, {"mb": 0.0, "chunks": 0, "sources": set()})
            entry["mb"] += len(text.encode("utf-8")) / 1e6
            entry["chunks"] += 1
            entry["sources"].add(source)
        stats[split] = {domain: {"mb": round(e["mb"], 4), "chunks": e["chunks"],
                                 "sources": len(e["sources"])}
                        for domain, e in sorted(per_domain.items())}
    return stats


def _sources(ds: datasets.Dataset) -> list[str]:
    # User datasets (``load_text_dataset``) have no source column: count rows instead.
    return ds["source"] if "source" in ds.column_names else list(map(str, range(len(ds))))
