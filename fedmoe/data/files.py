"""A local text file as rows, without ``datasets``: json, jsonl, csv, txt (parquet with pyarrow).

The slim device install (``pip install fedmoe``) has no ``datasets``: a SuperNode whose node
config names a ``data-path`` reads its file here, into the rows the ``hf`` loader
(:func:`fedmoe.data.hf.load_text_dataset`, for simulation) makes of the same file: ``text``
and ``domain`` (plus the alpaca fields of instruction records), empty texts dropped, split
80/10/10 by a hash of each text. The rules both loaders share live here, once: which field
holds the text, what an instruction record reads like, the file checks and the hash split.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

DEFAULT_DOMAIN = "default"
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Columns tried, in order, when no ``text_field`` is given.
TEXT_FIELD_CANDIDATES: tuple[str, ...] = ("text", "content", "document")
ALPACA_FIELDS: tuple[str, ...] = ("instruction", "input", "output")
# The reader (a ``datasets`` builder name) of each local file extension.
FORMATS: dict[str, str] = {".json": "json", ".jsonl": "json", ".csv": "csv",
                           ".parquet": "parquet", ".txt": "text"}

Row = dict[str, str]


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


def text_row(columns: Sequence[str], path: str,
             text_field: str | None) -> Callable[[Mapping], Row]:
    """How a record with ``columns`` becomes a row with a ``text`` field: from ``text_field``,
    from alpaca fields (kept too: :mod:`fedmoe.data.instruct` splits prompt from response
    with them) or from the first of :data:`TEXT_FIELD_CANDIDATES`.

    Raises
    ------
    ValueError
        Naming the file and its columns when none holds the text.
    """
    if text_field is not None:
        if text_field not in columns:
            raise ValueError(f"{path!r} has no text field {text_field!r} (data.text_field); "
                             f"its columns are {list(columns)}")
        return lambda r: {"text": str(r[text_field] or "")}
    if "instruction" in columns and "output" in columns:
        return lambda r: {"text": format_alpaca(r),
                          **{f: str(r.get(f) or "") for f in ALPACA_FIELDS}}
    for name in TEXT_FIELD_CANDIDATES:
        if name in columns:
            return lambda r, n=name: {"text": str(r[n] or "")}
    raise ValueError(f"{path!r} has no text field: none of {list(TEXT_FIELD_CANDIDATES)} nor "
                     f"alpaca fields {list(ALPACA_FIELDS)} among its columns {list(columns)}; "
                     f"set data.text_field")


def check_domain_field(columns: Sequence[str], path: str, domain_field: str | None) -> None:
    if domain_field is not None and domain_field not in columns:
        raise ValueError(f"{path!r} has no domain field {domain_field!r} (data.domain_field); "
                         f"its columns are {list(columns)}")


def file_format(path: Path) -> str:
    """The reader of a local file by its extension, after checking that it has text: not
    empty, UTF-8 (parquet aside). Errors name the file."""
    reader = FORMATS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"Cannot read {str(path)!r}: unknown extension {path.suffix!r}; "
                         f"expected one of {sorted(FORMATS)}")
    if path.stat().st_size < 2**16 and not path.read_bytes().strip():
        raise ValueError(f"data file {str(path)!r} is empty")
    if reader != "parquet":
        check_utf8(path)
    return reader


def check_utf8(path: Path, chunk: int = 2**20) -> None:
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


# --- readers: a file's records, each with every column (None where a record lacks one) -----


def _json_records(path: Path) -> list[dict]:
    """A JSON list (of objects, or of strings: ``text``), else JSON lines (one object each),
    as ``datasets``' json builder reads them."""
    content = path.read_text(encoding="utf-8")
    if content.lstrip().startswith("["):
        return [x if isinstance(x, dict) else {"text": x} for x in json.loads(content)]
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"data file {str(path)!r} cannot be read as json: line {number} "
                             "is malformed (expected one JSON object a line, or a JSON list)")
        records.append(record)
    return records


def _csv_records(path: Path) -> list[dict]:
    """Rows under the header line; cells kept as written (``datasets`` parses numbers)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _text_records(path: Path) -> list[dict]:
    """One record per line, the line break dropped (``datasets``' text builder)."""
    with open(path, encoding="utf-8") as f:
        return [{"text": line.rstrip("\n")} for line in f]


def _parquet_records(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ValueError(f"data file {str(path)!r} is parquet, which needs pyarrow: "
                         "pip install pyarrow (or 'fedmoe[sim]'), or give a json, jsonl, csv "
                         "or txt file") from None
    return pq.read_table(path).to_pylist()


_READERS: dict[str, Callable[[Path], list[dict]]] = {
    "json": _json_records, "csv": _csv_records, "text": _text_records,
    "parquet": _parquet_records}


def read_text_rows(path: str | Path, text_field: str | None = None,
                   domain_field: str | None = None,
                   default_domain: str = DEFAULT_DOMAIN) -> list[Row]:
    """A local ``.json``/``.jsonl``/``.csv``/``.txt`` (or, with pyarrow, ``.parquet``) file as
    rows with ``text`` and ``domain``, as :func:`fedmoe.data.hf.load_text_dataset` reads it.

    Parameters
    ----------
    path : str or Path
        The file.
    text_field : str | None
        Column holding the text; ``None``: alpaca records are formatted by
        :func:`format_alpaca`, else the first of ``text``, ``content``, ``document``.
    domain_field : str | None
        Column holding the domain label; ``None`` gives every row ``default_domain``.

    Returns
    -------
    list[dict[str, str]]
        In file order, rows with empty text dropped; instruction records keep ``instruction``,
        ``input`` and ``output``.
    """
    where = str(path)
    local = Path(path)
    if not local.is_file():
        raise FileNotFoundError(f"data file {where!r} " + ("is a directory, not a file"
                                                            if local.is_dir() else "not found"))
    records = _READERS[file_format(local)](local)
    columns = list(dict.fromkeys(key for record in records for key in record))
    check_domain_field(columns, where, domain_field)
    to_row = text_row(columns, where, text_field)
    rows = []
    for record in records:
        record = {c: record.get(c) for c in columns}  # every column, as in a table
        row = to_row(record)
        if row["text"].strip():
            domain = default_domain if domain_field is None else str(record[domain_field])
            rows.append(row | {"domain": domain})
    return rows


# --- the hash split ------------------------------------------------------------------------


def split_of(text: str, validation: float = 0.1, test: float = 0.1) -> str:
    """The split of a text, by a sha256 hash of it: equal texts always share a split (no
    duplicate leaks from train into evaluation), whatever the row order."""
    u = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return "validation" if u < validation else "test" if u < validation + test else "train"


def split_rows(rows: Sequence[Row], validation: float = 0.1,
               test: float = 0.1) -> dict[str, list[Row]]:
    """Rows into ``train``/``validation``/``test`` by :func:`split_of`, each in row order."""
    splits: dict[str, list[Row]] = {split: [] for split in SPLITS}
    for row in rows:
        splits[split_of(row["text"], validation, test)].append(row)
    return splits
