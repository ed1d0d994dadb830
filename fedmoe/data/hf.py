"""User text data: a hub dataset or local files, reduced to ``text`` and ``domain`` columns.

The simulation's loader (``datasets``, the ``sim`` extra). Which field holds the text and the
file checks are :mod:`fedmoe.data.files`', which reads a device's own file without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets

from fedmoe.data.files import (
    DEFAULT_DOMAIN,
    check_domain_field,
    file_format,
    text_row,
)

DataFiles = str | Sequence[str] | Mapping[str, str | Sequence[str]] | None


def _load_raw(path: str, split: str, data_files: DataFiles) -> datasets.Dataset:
    """``datasets.load_dataset`` for a local file (builder from its extension) or hub id/dir."""
    local = Path(path)
    if local.is_file():
        builder = file_format(local)
        try:
            # A single local file always loads as the "train" split of its builder.
            return datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as e:  # datasets' errors name neither the file nor the cause
            raise ValueError(f"data file {path!r} cannot be read as {builder}: "
                             f"{_cause(e)}") from e
    return datasets.load_dataset(path, data_files=data_files, split=split)


def _cause(error: BaseException) -> str:
    """What went wrong reading a file, in a few words (never its contents)."""
    while error.__cause__ is not None or error.__context__ is not None:
        if isinstance(error, UnicodeDecodeError):
            break
        error = error.__cause__ or error.__context__
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte {error.start})"
    return f"malformed ({type(error).__name__})"


def _text_column(ds: datasets.Dataset, path: str, text_field: str | None) -> datasets.Dataset:
    """A dataset with one ``text`` column from ``text_field``, alpaca fields or a default."""
    return ds.map(text_row(ds.column_names, path, text_field), remove_columns=ds.column_names)


def load_text_dataset(
    path: str,
    split: str = "train",
    text_field: str | None = None,
    domain_field: str | None = None,
    data_files: DataFiles = None,
    default_domain: str = DEFAULT_DOMAIN,
) -> datasets.Dataset:
    """Load user text as a dataset with ``text`` and ``domain`` columns.

    Parameters
    ----------
    path : str
        A local ``.json``/``.jsonl``/``.csv``/``.parquet``/``.txt`` file, a local directory
        or a hub id; the latter two go to ``datasets.load_dataset`` as they are.
    split : str
        Split to load from a directory or hub dataset (a single file is its own split).
    text_field : str | None
        Column holding the text. ``None``: records with ``instruction``/``output`` fields
        are formatted by `format_alpaca`, else the first of ``text``, ``content``,
        ``document`` is used.
    domain_field : str | None
        Column holding the domain label; ``None`` gives every row ``default_domain``.
    data_files : str | Sequence | Mapping | None
        Passed to ``datasets.load_dataset`` for directories and hub ids.

    Returns
    -------
    datasets.Dataset
        Columns ``text`` and ``domain`` (both strings), and ``instruction``, ``input``,
        ``output`` for instruction records; rows with empty text dropped.

    Raises
    ------
    ValueError
        Naming the file and the missing field when no text or domain column is found.
    """
    return text_dataset(_load_raw(path, split, data_files), path, text_field, domain_field,
                        default_domain)


def text_dataset(raw: datasets.Dataset, path: str, text_field: str | None = None,
                 domain_field: str | None = None,
                 default_domain: str = DEFAULT_DOMAIN) -> datasets.Dataset:
    """``raw`` rows (loaded from ``path``) reduced as :func:`load_text_dataset` describes:
    ``text`` and ``domain`` columns, empty texts dropped."""
    check_domain_field(raw.column_names, path, domain_field)
    domains = ([str(d) for d in raw[domain_field]] if domain_field is not None
               else [default_domain] * len(raw))
    ds = _text_column(raw, path, text_field).add_column("domain", domains)
    return ds.filter(lambda r: bool(r["text"].strip()))
