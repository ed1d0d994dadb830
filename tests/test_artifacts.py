"""A run's files (fedmoe/artifacts.py): client folders found by id, meta.json read once."""

import json

from fedmoe.artifacts import (
    META_FILE,
    client_dir,
    client_dirs,
    expert_counts,
    expert_counts_by_round,
    write_json,
)


def test_client_folders_and_their_expert_counts(tmp_path):
    # Prepare: clients 2 and 10 trained, 3 has no counts, 4 no meta.json; a stray folder
    metas = {2: {"expert_counts": {"0": [1, 2]}, "expert_counts_by_round": {"1": {"0": [1, 2]}}},
             10: {"expert_counts": {"0": [3, 0]}, "expert_counts_by_round": {"2": {"0": [3, 0]}}},
             3: {"rounds": 0}}
    for cid, meta in metas.items():
        write_json(client_dir(tmp_path, cid) / META_FILE, meta)
    client_dir(tmp_path, 4).mkdir()
    (tmp_path / "client_notes").mkdir()
    # Execute / Assert
    assert client_dir(tmp_path, 3).name == "client_0003"
    assert list(client_dirs(tmp_path)) == [2, 3, 4, 10]  # by id, not by name
    assert expert_counts(tmp_path) == {2: {"0": [1, 2]}, 10: {"0": [3, 0]}}
    assert expert_counts_by_round(tmp_path) == {1: {2: {"0": [1, 2]}}, 2: {10: {"0": [3, 0]}}}
    assert json.loads((client_dir(tmp_path, 3) / META_FILE).read_text()) == {"rounds": 0}
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary file
