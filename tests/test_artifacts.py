"""A run's files (fedmoe/artifacts.py): client folders found by id, meta.json read once."""

import json

import pytest

from fedmoe.artifacts import (
    EXPERTS_FILE,
    META_FILE,
    ClientMeta,
    ExpertsInfo,
    client_dir,
    client_dirs,
    client_metas,
    expert_counts,
    expert_counts_by_round,
    read_meta,
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


def test_meta_json_round_trips_through_client_meta_and_keeps_unknown_keys(tmp_path):
    # Prepare: a meta.json as a newer version might write it, with a key this one lacks
    path = client_dir(tmp_path, 0) / META_FILE
    on_disk = {"rounds": 3, "last_round": 5, "kept": {"0": [1, 4]}, "base_ppl": 41.5,
               "expert_counts": {"0": [0, 7, 0, 0, 2]}, "future_key": {"x": 1}}
    write_json(path, on_disk)
    # Execute
    meta = read_meta(path)
    # Assert: typed fields, int layer keys on request, nothing dropped on the way back
    assert (meta.rounds, meta.last_round, meta.base_ppl) == (3, 5, 41.5)
    assert meta.kept_ids() == {0: [1, 4]} and ClientMeta().kept_ids() == {}
    assert meta.extra == {"future_key": {"x": 1}}
    assert meta.to_dict() == on_disk | {"expert_counts_by_round": {}}  # the one default added
    assert client_metas(tmp_path) == {0: meta}


def test_an_experts_record_round_trips_and_a_broken_one_is_named(tmp_path):
    # Prepare
    info = ExpertsInfo(family="olmoe", num_experts_original=8, kept={1: [0, 5], 0: [2, 3]},
                       scores={0: [0.5, 0.25], 1: [1.0, 2.0]}, routing_stats=None)
    info.write(tmp_path)
    (tmp_path / "broken").mkdir()
    write_json(tmp_path / "broken" / EXPERTS_FILE, {"family": "olmoe", "kept": {"0": [1]}})
    # Execute / Assert: int layer keys back, strings in the file; a record without its expert
    # count names the file
    assert ExpertsInfo.read(tmp_path) == info
    assert list(json.loads((tmp_path / EXPERTS_FILE).read_text())["kept"]) == ["0", "1"]
    with pytest.raises(ValueError, match=r"broken/fedmoe_experts.json: .*num_experts_original"):
        ExpertsInfo.read(tmp_path / "broken")
