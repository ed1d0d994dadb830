"""Damaged files on a device or a SuperLink machine: one-line errors naming the file, a
checksum that catches a flipped byte, and private keys readable by their owner only."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedmoe.artifacts import ClientMeta
from fedmoe.checkpoints import load_model
from fedmoe.client.state import PersonalStore
from fedmoe.data.files import read_text_rows
from fedmoe.data.hf import load_text_dataset
from fedmoe.data.load import load_data
from fedmoe.fl.bridge import compose
from fedmoe.launch.certs import generate_supernode_keys, generate_tls_certificates

# --- key files ------------------------------------------------------------------------------


def test_key_files_are_rewritten_owner_only_whatever_their_old_mode(tmp_path):
    # Prepare: world-readable files where the keys go
    (tmp_path / "certs").mkdir()
    (tmp_path / "keys").mkdir()
    old = [tmp_path / "certs" / "server.key", tmp_path / "keys" / "phone"]
    for path in old:
        path.write_text("old")
        path.chmod(0o644)
    # Execute
    tls = generate_tls_certificates(tmp_path / "certs")
    keys = generate_supernode_keys(tmp_path / "keys", "phone")
    # Assert
    for path in (tls.server_key, keys.private_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert path.read_text() != "old"


# --- personal state -------------------------------------------------------------------------


def two_saves(directory: Path) -> PersonalStore:
    store = PersonalStore(directory)
    store.save({"experts": torch.ones(64)}, ClientMeta(rounds=1, last_round=1))
    store.save({"experts": torch.full((64,), 2.0)}, ClientMeta(rounds=2, last_round=2))
    return store


def test_a_flipped_byte_in_the_tensors_falls_back_to_the_previous_state(tmp_path, caplog):
    # Prepare: one byte of tensor data (not the header) changed: the file still parses
    store = two_saves(tmp_path)
    data = bytearray(store.tensors_path.read_bytes())
    data[-5] ^= 0x01
    store.tensors_path.write_bytes(bytes(data))
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmoe.client.state"):
        tensors, meta = PersonalStore(tmp_path).load()
    # Assert: the round-1 state, and the warning names the damaged file
    assert meta.rounds == 1 and torch.equal(tensors["experts"], torch.ones(64))
    assert f"{store.tensors_path}: its sha256 differs" in caplog.text


def test_non_finite_personal_tensors_on_disk_count_as_unreadable(tmp_path, caplog):
    store = two_saves(tmp_path)
    store.save({"experts": torch.full((64,), float("nan"))}, ClientMeta(rounds=3, last_round=3))
    with caplog.at_level(logging.WARNING, logger="fedmoe.client.state"):
        _, meta = PersonalStore(tmp_path).load()
    assert meta.rounds == 2
    assert "holds non-finite values in 'experts'" in caplog.text


# --- data files -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.jsonl", b"", "is empty"),
    ("blank.txt", b"\n\n  \n", "is empty"),
    ("latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1") * 3, "not UTF-8 text"),
    ("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8 text"),
    ("latin1.csv", "text\ncaf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', "malformed"),
])
@pytest.mark.parametrize("read", [load_text_dataset, read_text_rows])  # simulation, device
def test_unreadable_data_files_give_one_line_naming_the_file(tmp_path, name, content, message,
                                                            read):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        read(str(path))
    assert str(path) in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_one_line_data_file_names_the_file_and_the_empty_split(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text('{"text": "a single note"}\n')
    with pytest.raises(ValueError, match=r"one.jsonl'.*leave the \w+ split empty"):
        load_data(OmegaConf.create({"name": "hf", "path": str(path)}))


def test_a_one_line_device_file_names_the_data_path(tmp_path, base_model_dir):
    from fedmoe.client.local import local_blocks

    path = tmp_path / "one.jsonl"
    path.write_text('{"text": "a single note"}\n')
    data_yaml = OmegaConf.to_yaml(compose(["experiment=smoke"]).data, resolve=True)
    with pytest.raises(ValueError, match=r"data-path '.*one.jsonl' \(1 rows\) gives no full"):
        local_blocks(str(path), data_yaml, str(base_model_dir))


# --- checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model_dir(fedmoe_cache) -> Path:
    from fedmoe.train.pretrain import ensure_base_model

    return ensure_base_model(compose(["experiment=smoke", f"cache_dir={fedmoe_cache}"]),
                             progress=False)


def test_a_truncated_checkpoint_names_the_checkpoint(tmp_path, base_model_dir):
    # Prepare: a copy of the base model cut to half of its weights file
    damaged = tmp_path / "base"
    shutil.copytree(base_model_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # Execute / Assert
    with pytest.raises(ValueError) as error:
        load_model(compose(["experiment=smoke"]).model, checkpoint=damaged)
    assert f"checkpoint {str(damaged)!r}: its weights file is truncated or corrupt" in \
        str(error.value)
    assert "\n" not in str(error.value)
