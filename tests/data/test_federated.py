"""A hub dataset's clients through flwr-datasets' FederatedDataset, tested offline: the
FederatedDataset loads a local JSON file through the `json` builder (data.path=json,
data.data_files=<file>), as it would a hub id, and must give the clients the local-file path
gives for the same rows."""

from __future__ import annotations

import json

import pytest

from fedmoe.data import client_partitions, federated_client_datasets
from fedmoe.data.federated import is_hub_dataset

TOPICS = ("finance", "medicine", "code", "general")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """2,600 alpaca records of four topics (FlowerTune's record layout)."""
    path = tmp_path_factory.mktemp("fds") / "records.jsonl"
    rows = [{"instruction": f"Question {i} about {TOPICS[i % 4]}?", "input": "",
             "output": f"Answer {i}: " + "words " * (i % 7), "topic": TOPICS[i % 4]}
            for i in range(2600)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(path: str, partition: str, **extra) -> dict:
    return {"name": "hf", "path": path, "split": "train", "text_field": None,
            "domain_field": "topic", "partition": partition, "alpha": 0.5, "seed": 3, **extra}


@pytest.mark.parametrize("partition", ["natural", "iid", "dirichlet"])
def test_federated_dataset_gives_the_clients_of_the_local_path(records, partition):
    # Prepare: the same rows as a hub-style dataset (json builder) and as a local file
    hub = _config("json", partition, data_files=str(records))
    local = _config(str(records), partition)
    assert is_hub_dataset(hub) and not is_hub_dataset(local)

    # Execute
    clients = federated_client_datasets(hub, num_clients=4)
    expected = client_partitions(local, num_clients=4)

    # Assert: the same rows per client, train and validation; the scheme's shape
    assert [c.train["text"] for c in clients] == [c.train["text"] for c in expected]
    assert [c.validation["text"] for c in clients] == [c.validation["text"] for c in expected]
    assert sum(len(c.train) for c in clients) > 0.75 * 2600
    if partition == "natural":
        assert [c.domains for c in clients] == [[t] for t in sorted(TOPICS)]
    if partition == "iid":
        assert all(c.domains == sorted(TOPICS) for c in clients)


def test_client_partitions_takes_the_federated_path_for_a_dataset_id(records):
    clients = client_partitions(_config("json", "natural", data_files=str(records),
                                        max_rows_per_source=400), num_clients=4)

    # the first 400 records, 80% of them in train, one topic per client
    assert 280 < sum(len(c.train) for c in clients) < 360
    assert all(len(c.domains) == 1 for c in clients)


def test_a_missing_split_names_the_key(records):
    with pytest.raises(ValueError, match=r"data\.split='validation': 'json' has the splits "
                                         r"\['train'\]"):
        federated_client_datasets(_config("json", "iid", data_files=str(records),
                                          split="validation"), num_clients=2)
