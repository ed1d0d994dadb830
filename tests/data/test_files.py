"""A device's own file read without `datasets` (fedmoe.data.files) gives the rows, the split
and the token blocks that the `hf` loader (datasets) gives for the same file."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from fedmoe.data import load_text_dataset, read_text_rows, split_by_hash, split_rows
from fedmoe.data.files import SPLITS
from fedmoe.data.instruct import token_blocks
from tests.helpers.runs import REPO

WORDS = ["router", "expert", "gradient", "tensor", "device", "battery", "cache", "naïve", "日本"]


def records(n: int = 120) -> list[dict]:
    """Notes with a topic; one empty, one blank and one duplicated text (the split keeps
    duplicates together)."""
    rows = [{"text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(8 + i % 7))
             + f" note {i}.", "topic": f"t{i % 3}"} for i in range(n)]
    rows[3]["text"], rows[7]["text"], rows[11]["text"] = "", "   ", rows[10]["text"]
    return rows


def alpaca(n: int = 80) -> list[dict]:
    return [{"instruction": f"Sum {i} and {i + 1}.", "input": "" if i % 2 else f"{i} {i + 1}",
             "output": f"{2 * i + 1}"} for i in range(n)]


def write(path: Path) -> Path:
    """One file of every format the device path reads."""
    if path.name == "notes.jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records()))
    elif path.name == "notes.json":
        path.write_text(json.dumps(records(), ensure_ascii=False, indent=1))
    elif path.name == "strings.json":
        path.write_text(json.dumps([r["text"] for r in records()]))
    elif path.name == "alpaca.jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in alpaca()))
    elif path.name == "notes.csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "topic"])
            writer.writeheader()
            writer.writerows(records())
    elif path.name == "notes.txt":
        path.write_text("\n".join(r["text"] for r in records()) + "\n", encoding="utf-8")
    elif path.name == "notes.parquet":
        datasets.Dataset.from_list(records()).to_parquet(str(path))
    return path


FILES = ["notes.jsonl", "notes.json", "strings.json", "alpaca.jsonl", "notes.csv", "notes.txt",
         "notes.parquet"]
DATA = {"block_size": 16, "template": "alpaca", "response_only": True}


def topic(name: str) -> dict:
    return {"domain_field": "topic"} if name.startswith("notes.") and name != "notes.txt" \
        else {}


@pytest.mark.parametrize("name", FILES)
def test_plain_rows_are_the_rows_of_the_datasets_loader(tmp_path, name):
    # Prepare
    path = write(tmp_path / name)

    # Execute
    plain = read_text_rows(path, **topic(name))
    loaded = load_text_dataset(str(path), **topic(name)).to_list()

    # Assert: same rows, same order, empty texts dropped by both
    assert plain == loaded
    assert len(plain) == (80 if name == "alpaca.jsonl" else 118)


@pytest.mark.parametrize("name", ["notes.jsonl", "notes.csv", "notes.txt", "alpaca.jsonl"])
def test_plain_blocks_are_the_blocks_of_the_datasets_path(tmp_path, tiny_tokenizer, name):
    # Prepare: both paths as fedmoe.client.local.local_blocks takes them (train, and validation
    # and test together held out)
    path = write(tmp_path / name)
    plain = split_rows(read_text_rows(path, **topic(name)))
    loaded = split_by_hash(load_text_dataset(str(path), **topic(name)))
    plain["held_out"] = plain["validation"] + plain["test"]
    loaded = dict(loaded) | {"held_out": datasets.concatenate_datasets(
        [loaded["validation"], loaded["test"]])}

    for split in (*SPLITS, "held_out"):
        # Execute
        ids, labels = token_blocks(plain[split], tiny_tokenizer, DATA)
        expected_ids, expected_labels = token_blocks(loaded[split], tiny_tokenizer, DATA)

        # Assert: equal arrays; instruction records get labels (-100 on prompts) on both
        assert len(plain[split]) == len(loaded[split]), split
        assert torch.equal(ids, expected_ids), split
        assert (labels is None) == (expected_labels is None) == (name != "alpaca.jsonl")
        if labels is not None:
            assert torch.equal(labels, expected_labels), split
    assert len(token_blocks(plain["train"], tiny_tokenizer, DATA)[0]) > 4


def test_reading_and_tokenizing_a_device_file_imports_no_datasets(tmp_path):
    # Prepare
    path = write(tmp_path / "notes.jsonl")
    code = f"""
import sys
from fedmoe.data import read_text_rows, split_rows, train_tokenizer
from fedmoe.data.instruct import token_blocks
rows = read_text_rows({str(path)!r}, domain_field="topic")
tok = train_tokenizer([r["text"] for r in rows], vocab_size=300)
ids, _ = token_blocks(split_rows(rows)["train"], tok, {{"block_size": 16}})
print(len(ids), sorted(m for m in ("datasets", "pyarrow", "pandas") if m in sys.modules))
"""
    # Execute
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=300)

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    blocks, imported = proc.stdout.split(maxsplit=1)
    assert int(blocks) > 0 and imported.strip() == "[]"


@pytest.mark.parametrize(("content", "match"), [
    ('{"text": "a"}\n[1, 2]\n', "line 2 is malformed"),
    ('{"text": "a"}\n{"text": \n', "line 2 is malformed"),
    ("\n  \n", "is empty"),
])
def test_malformed_json_lines_name_the_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as error:
        read_text_rows(path)
    assert str(path) in str(error.value)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    # Prepare: pyarrow.parquet cannot be imported (as on the slim device install)
    path = write(tmp_path / "notes.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)

    # Execute / Assert: one line naming the file and the fixes
    with pytest.raises(ValueError, match=r"needs pyarrow: pip install pyarrow \(or "
                                         r"'fedmoe\[sim\]'\)") as error:
        read_text_rows(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_missing_file_or_field_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_text_rows(tmp_path / "absent.jsonl")
    path = write(tmp_path / "notes.jsonl")
    with pytest.raises(ValueError, match=r"no domain field 'lang' \(data.domain_field\)"):
        read_text_rows(path, domain_field="lang")
    with pytest.raises(ValueError, match=r"no text field 'body' \(data.text_field\)"):
        read_text_rows(path, text_field="body")
