"""User text data: a hub dataset or local files, reduced to ``text`` and ``domain`` columns."""

from __future__ import annotations

import codecs
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets

DEFAULT_DOMAIN = "default"
# Columns tried, in order, when no ``text_field`` is given.
TEXT_FIELD_CANDIDATES: tuple[str, ...] = ("text", "content", "document")
ALPACA_FIELDS: tuple[str, ...] = ("instruction", "input", "output")
# Builder of ``datasets.load_dataset`` per local file extension.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
             ".txt": "text"}

DataFiles = str | Sequence[str] | Mapping[str, str | Sequence[str]] | None


def format_alpaca(record: Mapping[str, object]) -> str:
    """Format an instruction record (``instruction``, optional ``input``, ``output``).

    Examples
    --------
    >>> format_alpaca({"instruction": "Add.", "input": "1 2", "output": "3"})
    '### Instruction:\\nAdd.\\n\\n### Input:\\n1 2\\n\\n### Response:\\n3'
    """
    parts = [f"### Instruction:\n{str(record['instruction']).strip()}"]
    if record.get("input"):
        parts.append(f"### Input:\n{str(record['input']).strip()}")
    parts.append(f"### Response:\n{str(record.get('output') or '').strip()}")
    return "\n\n".join(parts)


def _load_raw(path: str, split: str, data_files: DataFiles) -> datasets.Dataset:
    """``datasets.load_dataset`` for a local file (builder from its extension) or hub id/dir."""
    local = Path(path)
    if local.is_file():
        builder = _BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(f"Cannot read {path!r}: unknown extension {local.suffix!r}; "
                             f"expected one of {sorted(_BUILDERS)}")
        if local.stat().st_size < 2**16 and not local.read_bytes().strip():
            raise ValueError(f"data file {path!r} is empty")
        if builder != "parquet":
            _check_utf8(local)
        try:
            # A single local file always loads as the "train" split of its builder.
            return datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as e:  # datasets' errors name neither the file nor the cause
            raise ValueError(f"data file {path!r} cannot be read as {builder}: "
                             f"{_cause(e)}") from e
    return datasets.load_dataset(path, data_files=data_files, split=split)


def _check_utf8(path: Path, chunk: int = 2**20) -> None:
    """Raise naming ``path`` and the byte offset when the file is not UTF-8 text (datasets
    fails on it deep inside a worker, or later while mapping rows)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise ValueError(f"data file {str(path)!r} is not UTF-8 text (byte "
                                 f"{offset + e.start})") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text (it ends inside a "
                         "character)") from None


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
    columns = ds.column_names
    if text_field is not None:
        if text_field not in columns:
            raise ValueError(f"{path!r} has no text field {text_field!r} (data.text_field); "
                             f"its columns are {columns}")
        return ds.map(lambda r: {"text": str(r[text_field] or "")}, remove_columns=columns)
    if "instruction" in columns and "output" in columns:
        # The fields stay too: fedmoe.data.instruct splits prompt from response with them.
        return ds.map(lambda r: {"text": format_alpaca(r),
                                 **{f: str(r.get(f) or "") for f in ALPACA_FIELDS}},
                      remove_columns=columns)
    for name in TEXT_FIELD_CANDIDATES:
        if name in columns:
            return ds.map(lambda r, n=name: {"text": str(r[n] or "")}, remove_columns=columns)
    raise ValueError(f"{path!r} has no text field: none of {list(TEXT_FIELD_CANDIDATES)} nor "
                     f"alpaca fields {list(ALPACA_FIELDS)} among its columns {columns}; "
                     f"set data.text_field")


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
    raw = _load_raw(path, split, data_files)
    if domain_field is not None and domain_field not in raw.column_names:
        raise ValueError(f"{path!r} has no domain field {domain_field!r} (data.domain_field); "
                         f"its columns are {raw.column_names}")
    domains = ([str(d) for d in raw[domain_field]] if domain_field is not None
               else [default_domain] * len(raw))
    ds = _text_column(raw, path, text_field).add_column("domain", domains)
    return ds.filter(lambda r: bool(r["text"].strip()))
