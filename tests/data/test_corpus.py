"""The embedded corpus: content, splits without leakage, determinism, cache."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedmoe.data import DOMAINS, build_corpus, chunk_text
from fedmoe.data.corpus import module_docstrings
from tests.helpers.corpus import corpus_stats

SMALL_MB = 0.5  # as the small_corpus fixture (conftest.py)


def test_domains_are_four_distinct_kinds_of_text(small_corpus):
    # Prepare
    train = small_corpus["train"]
    first = {d: train[train["domain"].index(d)]["text"] for d in DOMAINS}

    # Execute / Assert: each domain looks like what it claims to be
    assert len(DOMAINS) >= 4
    assert set(train["domain"]) == set(DOMAINS)
    assert all(s.endswith(".py") for s, d in zip(train["source"], train["domain"], strict=True)
               if d == "python_code")
    assert all(s.endswith(".h") for s, d in zip(train["source"], train["domain"], strict=True)
               if d == "c_headers")
    assert "#" in first["c_headers"]
    assert first["docstrings"].strip()


@pytest.mark.slow
def test_default_size_has_at_least_04_mb_per_domain(corpus_cache):
    # Execute
    stats = corpus_stats(build_corpus(cache_dir=corpus_cache))

    # Assert
    for domain in DOMAINS:
        total_mb = sum(stats[split][domain]["mb"] for split in stats)
        assert 0.4 <= total_mb <= 2.0 + 0.01, (domain, total_mb)


def test_size_cap_is_respected(small_corpus):
    # Execute
    stats = corpus_stats(small_corpus)

    # Assert: the 0.5 MB cap holds (chunking only drops whitespace)
    for domain in DOMAINS:
        total_mb = sum(stats[split][domain]["mb"] for split in stats)
        assert 0.3 < total_mb <= SMALL_MB, (domain, total_mb)


def test_no_source_in_two_splits(small_corpus):
    # Prepare
    keys = {split: set(zip(ds["domain"], ds["source"], strict=True))
            for split, ds in small_corpus.items()}

    # Assert
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


def test_code_and_docstrings_of_a_module_share_a_split(small_corpus):
    # Prepare: module path -> split, per stdlib domain
    split_of = {domain: {} for domain in ("python_code", "docstrings")}
    for split, ds in small_corpus.items():
        for domain, source in zip(ds["domain"], ds["source"], strict=True):
            if domain in split_of:
                split_of[domain][source] = split

    # Execute
    shared = split_of["python_code"].keys() & split_of["docstrings"].keys()

    # Assert
    assert shared
    assert all(split_of["python_code"][s] == split_of["docstrings"][s] for s in shared)


def test_every_domain_has_validation_and_test_rows(small_corpus):
    # Execute
    stats = corpus_stats(small_corpus)

    # Assert
    for split in ("validation", "test"):
        for domain in DOMAINS:
            assert stats[split][domain]["chunks"] > 0, (split, domain)


def test_chunks_respect_chunk_chars(small_corpus):
    # Execute
    lengths = [len(t) for ds in small_corpus.values() for t in ds["text"]]

    # Assert
    assert max(lengths) <= 2000
    assert min(lengths) > 0


def test_build_is_deterministic_and_cached(small_corpus, tmp_path):
    # Execute: a fresh build in another cache, then a cached reload
    fresh = build_corpus(max_mb_per_domain=SMALL_MB, cache_dir=tmp_path)
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    cached = build_corpus(max_mb_per_domain=SMALL_MB, cache_dir=tmp_path)

    # Assert: the same rows; the reload read the cache and wrote nothing
    for split in small_corpus:
        assert fresh[split].to_dict() == small_corpus[split].to_dict()
        assert cached[split].to_dict() == small_corpus[split].to_dict()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == written
    assert len(list(tmp_path.iterdir())) == 1
    assert {Path(f["filename"]).parent.parent for f in cached["train"].cache_files} == {
        next(tmp_path.iterdir())}


def test_chunk_text_cuts_at_line_boundaries():
    # Prepare
    text = "aaaa\nbbbb\ncccc\n" + "x" * 9 + "\n"

    # Execute
    chunks = chunk_text(text, chunk_chars=10)

    # Assert: whole lines are kept together; the 10-char line is cut hard
    assert chunks == ["aaaa\nbbbb\n", "cccc\n", "xxxxxxxxx\n"]
    assert "".join(chunks) == text


def test_module_docstrings_reads_without_importing():
    # Prepare: importing this code would raise
    code = ('"""Module doc that is long enough to keep here."""\nraise SystemExit\n'
            'def f():\n    """Function doc, long enough to pass the filter."""\n')

    # Execute
    text = module_docstrings(code)

    # Assert
    assert text == ("Module doc that is long enough to keep here.\n\n"
                    "Function doc, long enough to pass the filter.")


# --- the eight domains of the research benchmark (data.domains) -------------------------------


@pytest.fixture(scope="module")
def eight_domains(corpus_cache):
    from fedmoe.data.corpus import ALL_DOMAINS

    return build_corpus(max_mb_per_domain=0.2, cache_dir=corpus_cache, domains=ALL_DOMAINS)


def test_eight_domains_each_have_every_split_and_their_own_kind_of_text(eight_domains):
    # Prepare
    from fedmoe.data.corpus import ALL_DOMAINS

    stats = corpus_stats(eight_domains)
    train = eight_domains["train"]
    first = {d: train[train["domain"].index(d)]["text"] for d in ALL_DOMAINS}

    # Assert: eight domains, each in every split, each recognisable by its own text
    assert len(ALL_DOMAINS) == 8
    for split in ("train", "validation", "test"):
        assert set(stats[split]) == set(ALL_DOMAINS), split
    assert all(re.fullmatch(r"[0-9A-F]{4,6} [A-Z0-9 ()-]+ [A-Z][a-z]", line)
               for line in first["unicode_names"].splitlines()), first["unicode_names"][:200]
    assert any(op in first["decimal_tests"] for op in ("->", "precision:", "rounding:"))
    assert "decoding_table" in "".join(t for t, d in zip(train["text"], train["domain"],
                                                         strict=True) if d == "codec_tables")
    assert any(op in first["bytecode"] for op in ("LOAD_", "RESUME", "STORE_"))


def test_eight_domains_leak_no_source_and_keep_codecs_out_of_python_code(eight_domains):
    # Prepare: (domain, source) per split; the stdlib files of each domain
    keys = {split: set(zip(ds["domain"], ds["source"], strict=True))
            for split, ds in eight_domains.items()}
    sources = {d: {s for split in keys.values() for dd, s in split if dd == d}
               for d in ("python_code", "docstrings", "bytecode", "codec_tables")}
    split_of = {(d, s): split for split, k in keys.items() for d, s in k}

    # Assert: no source in two splits; encodings/ only in codec_tables; a module's code,
    # docstrings and bytecode share a split
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    for domain in ("python_code", "docstrings", "bytecode"):
        assert not any(s.startswith("encodings/") for s in sources[domain]), domain
    shared = sources["python_code"] & sources["bytecode"]
    assert all(split_of["python_code", s] == split_of["bytecode", s] for s in shared)


def test_default_domains_keep_the_default_corpus_and_its_cache_key():
    # Prepare
    from fedmoe.data.corpus import _cache_key, check_domains

    # Assert: null is the four default domains, so existing corpora and base models stay valid
    assert check_domains(None) == DOMAINS
    assert _cache_key(2.0, 2000, 0) == _cache_key(2.0, 2000, 0, check_domains(None))


@pytest.mark.parametrize("domains", [["python_code", "poetry"], [], ["email", "email"]])
def test_unknown_or_repeated_domains_are_one_line_config_errors(domains):
    # Prepare
    from fedmoe.data.corpus import check_domains

    # Execute / Assert
    with pytest.raises(ValueError, match=r"data\.domains"):
        check_domains(domains)


def test_bytecode_listings_are_the_same_in_every_build_and_hold_no_addresses():
    # Prepare
    from itertools import islice

    from fedmoe.data.corpus import _bytecode_sources

    # Execute: the first stdlib modules' listings, twice (other code objects, other addresses)
    first = list(islice(_bytecode_sources(), 40))
    second = list(islice(_bytecode_sources(), 40))

    # Assert
    assert first == second
    assert any("<code object " in text for _, text in first)  # nested code objects are named
    assert not any(re.search(r"0x[0-9a-f]{6,}", text) for _, text in first)
