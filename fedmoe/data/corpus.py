"""The embedded corpus: text domains that a CPython installation carries.

Nothing is downloaded. The text comes from the running interpreter's own files, located
with ``sysconfig``. The four default domains (``DOMAINS``):

- ``python_code``: standard-library ``.py`` sources (tests, idlelib, lib2to3 and
  site-packages left out),
- ``c_headers``: the C headers of the Python include directory,
- ``reference``: the reference-manual topics of ``pydoc_data.topics``,
- ``docstrings``: prose of module, class and function docstrings, read with ``ast``
  (never by importing the modules).

Four more (``EXTRA_DOMAINS``, chosen with ``data.domains``; the research benchmark uses all
eight):

- ``unicode_names``: the Unicode character database of ``unicodedata`` as text, one line per
  named code point (code, name, category), one source per block of 256 code points;
- ``decimal_tests``: the General Decimal Arithmetic test cases (``test/decimaltestdata``),
- ``codec_tables``: the generated charmap codecs of ``encodings`` (byte <-> Unicode tables);
  when chosen, ``encodings`` leaves ``python_code``, ``docstrings`` and ``bytecode``, so no
  file is in two domains;
- ``bytecode``: ``dis`` listings of the stdlib modules, compiled with ``compile`` (never
  executed), runs of spaces collapsed; a module's listing lands in the same split as its code.

``decimal_tests`` needs the interpreter's ``test`` package (CPython and pyenv builds carry it;
some Linux distributions ship it separately); a missing one is a one-line error.

Data flows: sources (domain, source id, text) -> per-domain size cap -> split by a hash
of the source id -> chunks cut at line boundaries -> ``datasets.DatasetDict``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets

from fedmoe.data.files import SPLITS

DOMAINS: tuple[str, ...] = ("python_code", "c_headers", "reference", "docstrings")
EXTRA_DOMAINS: tuple[str, ...] = ("unicode_names", "decimal_tests", "codec_tables", "bytecode")
ALL_DOMAINS: tuple[str, ...] = DOMAINS + EXTRA_DOMAINS
# Fractions of sources per split; train gets the rest.
_SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1}
# Bump when the corpus content changes for the same arguments, so stale caches are skipped.
_CORPUS_VERSION = 1
# The same, per domain (a domain not listed is at version 1); only a chosen domain's version
# enters the corpus key and the base checkpoint's (so other corpora keep theirs).
#   bytecode 2: dis listings without the memory addresses of nested code objects ("<code
#               object f at 0x7f...>"), which changed from one build to the next
DOMAIN_VERSIONS: dict[str, int] = {"bytecode": 2}
_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3",
                            "__pycache__", "turtledemo"})
_MIN_DOCSTRING_CHARS = 40
_STDLIB_DOMAINS = frozenset({"python_code", "docstrings", "bytecode"})

Source = tuple[str, str]  # (source id, text)


# --- sources -------------------------------------------------------------------------


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_py_files(without_codecs: bool = False) -> list[str]:
    """Relative paths (POSIX) of the stdlib ``.py`` files that make up the corpus, sorted.

    ``without_codecs`` leaves out ``encodings/`` (it is the ``codec_tables`` domain then).
    """
    root = _stdlib_dir()
    excluded = _EXCLUDED_DIRS | {"encodings"} if without_codecs else _EXCLUDED_DIRS
    rel_paths = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not excluded.intersection(rel.parts[:-1]):
            rel_paths.append(rel.as_posix())
    return sorted(rel_paths)


def _read(path: Path) -> str:
    # A few stdlib files carry latin-1 bytes; replace rather than skip them.
    return path.read_text(encoding="utf-8", errors="replace")


def _python_code_sources(without_codecs: bool = False) -> Iterator[Source]:
    root = _stdlib_dir()
    for rel in _stdlib_py_files(without_codecs):
        yield rel, _read(root / rel)


def _c_header_sources() -> Iterator[Source]:
    root = Path(sysconfig.get_paths()["include"])
    for path in sorted(root.rglob("*.h")):
        yield path.relative_to(root).as_posix(), _read(path)


def _reference_sources() -> Iterator[Source]:
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        yield topic, topics[topic]


def module_docstrings(code: str) -> str:
    """Docstrings of a module, its classes and functions, joined by blank lines.

    Parameters
    ----------
    code : str
        Python source text; parsed with ``ast``, never executed.

    Returns
    -------
    str
        The docstrings longer than a one-liner stub, in ``ast.walk`` order; ``""`` when the
        code does not parse or has none.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return "\n\n".join(doc for doc in docs if doc and len(doc) >= _MIN_DOCSTRING_CHARS)


def _docstring_sources(without_codecs: bool = False) -> Iterator[Source]:
    root = _stdlib_dir()
    for rel in _stdlib_py_files(without_codecs):
        text = module_docstrings(_read(root / rel))
        if text:
            yield rel, text


def _unicode_name_sources() -> Iterator[Source]:
    """One source per block of 256 code points: lines ``XXXX NAME Category``.

    Names that only restate the code point (``CJK UNIFIED IDEOGRAPH-4E00`` and the like) are
    left out; blocks without another name yield nothing.
    """
    import unicodedata

    for start in range(0, sys.maxunicode + 1, 256):
        lines = []
        for cp in range(start, start + 256):
            name = unicodedata.name(chr(cp), "")
            if name and not name.endswith(f"{cp:04X}"):
                lines.append(f"{cp:04X} {name} {unicodedata.category(chr(cp))}\n")
        if lines:
            yield f"U+{start:04X}", "".join(lines)


def _test_data_dir(rel: str, domain: str) -> Path:
    path = _stdlib_dir() / "test" / rel
    if not path.is_dir():
        raise FileNotFoundError(f"data.domains: domain {domain!r} reads {path}, which this Python "
                                f"installation does not have (its test package is missing)")
    return path


def _decimal_test_sources() -> Iterator[Source]:
    root = _test_data_dir("decimaltestdata", "decimal_tests")
    for path in sorted(root.glob("*.decTest")):
        yield path.name, _read(path)


def _bytecode_sources(without_codecs: bool = False) -> Iterator[Source]:
    import dis
    import io

    root = _stdlib_dir()
    for rel in _stdlib_py_files(without_codecs):
        try:
            code = compile(_read(root / rel), rel, "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            continue
        listing = io.StringIO()
        dis.dis(code, file=listing)
        text = _ADDRESS.sub("", listing.getvalue())  # where the object lay in this process
        yield rel, "".join(" ".join(line.split()) + "\n" for line in text.splitlines())


_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _codec_table_sources() -> Iterator[Source]:
    root = _stdlib_dir() / "encodings"
    for path in sorted(root.glob("*.py")):
        text = _read(path)
        if "decoding_table" in text or "decoding_map" in text:
            yield path.name, text


_SOURCE_READERS: dict[str, Callable[[], Iterator[Source]]] = {
    "python_code": _python_code_sources,
    "c_headers": _c_header_sources,
    "reference": _reference_sources,
    "docstrings": _docstring_sources,
    "unicode_names": _unicode_name_sources,
    "decimal_tests": _decimal_test_sources,
    "codec_tables": _codec_table_sources,
    "bytecode": _bytecode_sources,
}


def check_domains(domains: Iterable[str] | None) -> tuple[str, ...]:
    """``data.domains`` as a tuple in the order given; ``None`` is the default four.

    Raises
    ------
    ValueError
        On an unknown or repeated domain, or an empty list, naming ``data.domains``.
    """
    if domains is None:
        return DOMAINS
    chosen = tuple(str(d) for d in domains)
    unknown = [d for d in chosen if d not in _SOURCE_READERS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"data.domains={list(chosen)} must be distinct names from "
                         f"{list(ALL_DOMAINS)}" + (f"; unknown: {unknown}" if unknown else ""))
    return chosen


# --- split assignment and size cap --------------------------------------------------


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) for ``key`` (sha256; Python's ``hash`` is salted)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_of(position: float) -> str:
    if position < _SPLIT_FRACTIONS["validation"]:
        return "validation"
    if position < _SPLIT_FRACTIONS["validation"] + _SPLIT_FRACTIONS["test"]:
        return "test"
    return "train"


def _assign_splits(sizes: dict[str, int], seed: int) -> dict[str, str]:
    """Map each source id to a split so that each split gets its share of the *bytes*.

    Sources are shuffled by a hash of ``seed`` and their id, then laid end to end; a source
    goes to the split whose interval (validation [0, .1), test [.1, .2), train) holds the
    midpoint of its byte range. Counting bytes rather than sources matters for
    ``reference``, where a few topics hold most of the text.
    """
    order = _split_order(sizes, seed)
    total, done, split = max(sum(sizes.values()), 1), 0, {}
    for sid in order:
        split[sid] = _split_of((done + sizes[sid] / 2) / total)
        done += sizes[sid]
    return _ensure_nonempty(split, order)


def _split_order(source_ids: Iterable[str], seed: int) -> list[str]:
    return sorted(source_ids, key=lambda sid: (_unit_hash(f"split/{seed}/{sid}"), sid))


def _ensure_nonempty(split: dict[str, str], order: list[str]) -> dict[str, str]:
    """Move the first train sources (in hash ``order``) into empty held-out splits."""
    split = dict(split)
    for name in ("validation", "test"):
        donors = [sid for sid in order if split[sid] == "train"]
        if name not in split.values() and donors:
            split[donors[0]] = name
    return split


def _stdlib_splits(seed: int, without_codecs: bool = False) -> dict[str, str]:
    """One split map for all stdlib files, shared by ``python_code`` and ``docstrings``.

    A module's code and its docstrings thus land in the same split, so docstrings seen in
    training (inside the code) never reappear in evaluation.
    """
    root = _stdlib_dir()
    return _assign_splits({rel: (root / rel).stat().st_size
                           for rel in _stdlib_py_files(without_codecs)}, seed)


def _capped_sources(domain: str, max_bytes: int, seed: int,
                    without_codecs: bool = False) -> list[Source]:
    """The domain's sources in hash order until ``max_bytes`` of UTF-8 text is reached.

    Hash order (not path order) spreads the cap over the whole stdlib instead of taking
    only the modules that sort first; the last source is cut at a line boundary. The hash
    is salted apart from the split hash, so the cap does not favour one split.
    """
    reader = _SOURCE_READERS[domain]
    read = reader(without_codecs) if domain in _STDLIB_DOMAINS else reader()
    sources = sorted(((sid, text) for sid, text in read if text.strip()),
                     key=lambda s: (_unit_hash(f"order/{seed}/{s[0]}"), s[0]))
    kept, total = [], 0
    for sid, text in sources:
        if total + len(text.encode("utf-8")) > max_bytes:
            text = _cut_at_line(text, max_bytes - total)
            if not text.strip():
                break
        kept.append((sid, text))
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return kept


def _cut_at_line(text: str, max_bytes: int) -> str:
    """The longest prefix of whole lines of ``text`` within ``max_bytes`` UTF-8 bytes."""
    prefix = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return prefix[: prefix.rfind("\n") + 1]


# --- chunking -------------------------------------------------------------------------


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cut ``text`` into chunks of at most ``chunk_chars`` characters at line boundaries.

    Lines longer than ``chunk_chars`` (rare: minified tables) are cut hard. Chunks that are
    only whitespace are dropped.
    """
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        pieces = [line[i : i + chunk_chars] for i in range(0, len(line), chunk_chars)]
        for piece in pieces:
            if size + len(piece) > chunk_chars:
                chunks.append("".join(current))
                current, size = [], 0
            current.append(piece)
            size += len(piece)
    chunks.append("".join(current))
    return [chunk for chunk in chunks if chunk.strip()]


# --- building and caching -------------------------------------------------------------


def _build_rows(max_mb_per_domain: float, chunk_chars: int, seed: int,
                domains: tuple[str, ...] = DOMAINS) -> dict[str, dict]:
    """Column dicts per split, domains in the given order, sources sorted within."""
    rows = {split: {"text": [], "domain": [], "source": []} for split in SPLITS}
    max_bytes = int(max_mb_per_domain * 1e6)
    without_codecs = "codec_tables" in domains
    stdlib_splits = _stdlib_splits(seed, without_codecs)
    for domain in domains:
        sources = sorted(_capped_sources(domain, max_bytes, seed, without_codecs))
        if not sources:
            raise ValueError(f"data.domains: domain {domain!r} has no text in this Python "
                             f"installation")
        if domain in _STDLIB_DOMAINS:
            order = _split_order((sid for sid, _ in sources), seed)
            split_of = _ensure_nonempty({sid: stdlib_splits[sid] for sid in order}, order)
        else:
            split_of = _assign_splits({sid: len(text.encode()) for sid, text in sources}, seed)
        for sid, text in sources:
            columns = rows[split_of[sid]]
            for chunk in chunk_text(text, chunk_chars):
                columns["text"].append(chunk)
                columns["domain"].append(domain)
                columns["source"].append(sid)
    return rows


def _default_cache_dir() -> Path:
    from fedmoe.cache import cache_root

    return cache_root() / "corpus"


def domain_versions(domains: Iterable[str] | None) -> dict[str, int]:
    """The content version of each chosen domain that is past version 1 (``DOMAIN_VERSIONS``);
    ``None``: the default domains."""
    return {d: DOMAIN_VERSIONS[d] for d in check_domains(domains) if d in DOMAIN_VERSIONS}


def _cache_key(max_mb_per_domain: float, chunk_chars: int, seed: int,
               domains: tuple[str, ...] = DOMAINS) -> str:
    spec = {"version": _CORPUS_VERSION, "domains": domains, "python": sys.version,
            "max_mb_per_domain": float(max_mb_per_domain), "chunk_chars": chunk_chars,
            "seed": seed}
    if versions := domain_versions(domains):
        spec["domain_versions"] = versions
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_corpus(
    max_mb_per_domain: float = 2.0,
    chunk_chars: int = 2000,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    domains: Iterable[str] | None = None,
) -> datasets.DatasetDict:
    """Build (or load from cache) the embedded multi-domain corpus.

    Parameters
    ----------
    max_mb_per_domain : float
        Cap on the UTF-8 text per domain, in MB (1e6 bytes), over all splits. Domains that
        hold less (``reference`` has about 0.46 MB) are taken whole.
    chunk_chars : int
        Maximum characters per row; rows are cut at line boundaries.
    seed : int
        Salt of the hash that orders sources and assigns them to splits.
    cache_dir : str | Path | None
        Where built corpora are saved (``save_to_disk``), keyed by the arguments and the
        Python version. ``None`` uses ``corpus/`` under :func:`fedmoe.cache.cache_root`.

    Returns
    -------
    datasets.DatasetDict
        Splits ``train``/``validation``/``test`` (about 80/10/10 of the sources of each
        domain, no source in two splits), columns ``text``, ``domain``, ``source``.
        The same arguments give identical datasets.
    """
    if max_mb_per_domain <= 0 or chunk_chars <= 0:
        raise ValueError(f"build_corpus needs max_mb_per_domain > 0 and chunk_chars > 0, got "
                         f"{max_mb_per_domain} and {chunk_chars}")
    domains = check_domains(domains)
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    path = root / _cache_key(max_mb_per_domain, chunk_chars, seed, domains)
    if (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))
    features = datasets.Features({name: datasets.Value("string")
                                  for name in ("text", "domain", "source")})
    rows = _build_rows(max_mb_per_domain, chunk_chars, seed, domains)
    dd = datasets.DatasetDict({split: datasets.Dataset.from_dict(rows[split], features=features)
                               for split in SPLITS})
    # Save under a temporary name then rename, so a killed build never looks complete.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    dd.save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return datasets.load_from_disk(str(path))
