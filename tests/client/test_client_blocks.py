"""A client's tokenized blocks are kept on disk: a ClientApp process per message (Flower's
Deployment Engine) reads them back instead of partitioning and tokenizing again."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from fedmoe.client import local
from fedmoe.fl.bridge import compose


def test_blocks_read_back_from_disk_equal_the_tokenized_ones(smoke_base, monkeypatch,
                                                             tmp_path):
    # Prepare: an empty cache for the blocks
    monkeypatch.setenv("FEDMOE_CACHE", str(tmp_path))
    data_yaml = OmegaConf.to_yaml(compose(["experiment=smoke"]).data, resolve=True)
    local.client_blocks.cache_clear()
    # Execute: tokenize (and keep), then read back in a "new process" (no in-memory cache)
    first = local.client_blocks(data_yaml, str(smoke_base), 1)
    local.client_blocks.cache_clear()
    second = local.client_blocks(data_yaml, str(smoke_base), 1)
    other = local._blocks_path(data_yaml.replace("block_size: 64", "block_size: 32"),
                               str(smoke_base), 1)
    local.client_blocks.cache_clear()
    # Assert: one file, the same blocks; another data config is another file
    files = list((tmp_path / "blocks").glob("*.npz"))
    assert [f.name for f in files] == [local._blocks_path(data_yaml, str(smoke_base), 1).name]
    assert other.name != files[0].name
    torch.testing.assert_close(second.train, first.train, rtol=0, atol=0)
    torch.testing.assert_close(second.validation, first.validation, rtol=0, atol=0)
    assert second.domains == first.domains and second.train_labels is None
    assert first.train.shape[0] > 0
