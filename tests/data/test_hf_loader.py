"""Loading user text from local files of every supported format."""

from __future__ import annotations

import csv
import json

import datasets
import pytest

from fedmoe.data import format_alpaca, load_data, load_text_dataset

ROWS = [{"text": "first document", "topic": "a"}, {"text": "second one", "topic": "b"},
        {"text": "third", "topic": "a"}]


def _write(path, rows) -> str:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_tabular_formats_give_text_and_domain(tmp_path, suffix):
    # Prepare
    path = _write(tmp_path / f"data{suffix}", ROWS)

    # Execute
    ds = load_text_dataset(path, domain_field="topic")

    # Assert
    assert ds.column_names == ["text", "domain"]
    assert ds["text"] == [r["text"] for r in ROWS]
    assert ds["domain"] == ["a", "b", "a"]


def test_txt_rows_are_lines_with_default_domain(tmp_path):
    # Prepare
    path = tmp_path / "notes.txt"
    path.write_text("line one\n\nline two\n")

    # Execute
    ds = load_text_dataset(str(path))

    # Assert: the empty line is dropped
    assert ds["text"] == ["line one", "line two"]
    assert ds["domain"] == ["default", "default"]


def test_alpaca_json_is_formatted(tmp_path):
    # Prepare
    records = [{"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "hi"}]
    path = _write(tmp_path / "alpaca.json", records)

    # Execute
    ds = load_text_dataset(path)

    # Assert
    assert ds["text"][0] == ("### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n"
                             "### Response:\n5")
    assert ds["text"][1] == "### Instruction:\nSay hi.\n\n### Response:\nhi"
    assert format_alpaca(records[1]) == ds["text"][1]


def test_explicit_text_field(tmp_path):
    # Prepare
    path = _write(tmp_path / "d.jsonl", [{"body": "x y"}, {"body": "z"}])

    # Execute
    ds = load_text_dataset(path, text_field="body")

    # Assert
    assert ds["text"] == ["x y", "z"]


def test_missing_text_field_names_file_and_field(tmp_path):
    # Prepare
    path = _write(tmp_path / "bad.jsonl", [{"body": "x"}])

    # Execute / Assert
    with pytest.raises(ValueError, match=r"bad\.jsonl.*no text field.*body"):
        load_text_dataset(path)
    with pytest.raises(ValueError, match=r"bad\.jsonl.*'prose'.*data\.text_field"):
        load_text_dataset(path, text_field="prose")


def test_load_data_hf_splits_by_text_hash(tmp_path):
    # Prepare
    rows = [{"text": f"document number {i}"} for i in range(200)]
    path = _write(tmp_path / "many.jsonl", rows)

    # Execute
    dd = load_data({"name": "hf", "path": path, "split": "train", "text_field": None,
                    "domain_field": None})
    again = load_data({"name": "hf", "path": path})

    # Assert: a partition of the rows, about 80/10/10, the same on every call
    texts = [set(dd[s]["text"]) for s in ("train", "validation", "test")]
    assert sum(map(len, texts)) == 200
    assert set.union(*texts) == {r["text"] for r in rows}
    assert 130 < len(texts[0]) < 185
    assert dd["test"]["text"] == again["test"]["text"]


def test_load_data_unknown_name():
    # Execute / Assert
    with pytest.raises(ValueError, match=r"data\.name 'nope'.*embedded.*hf"):
        load_data({"name": "nope"})
