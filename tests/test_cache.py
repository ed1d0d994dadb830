"""The cache root: the user's cache directory by default, ``$FEDMOE_CACHE`` when set."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmoe.cache import cache_root, user_cache_dir
from fedmoe.compose import compose

PRIMARY = ["simulate", "pretrain", "analyze", "prune_model"]


def _cache_dirs(config_name: str) -> tuple[str, str]:
    cfg = compose(config_name)
    return cfg.cache_dir, cfg.data.cache_dir


@pytest.fixture
def xdg(tmp_path, monkeypatch) -> Path:
    """A private $XDG_CACHE_HOME and no $FEDMOE_CACHE (the user's real cache stays untouched)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("FEDMOE_CACHE", raising=False)
    return tmp_path / "xdg"


def test_default_is_the_user_cache(xdg):
    assert user_cache_dir() == xdg / "fedmoe"
    assert cache_root() == xdg / "fedmoe"


def test_fedmoe_cache_wins(xdg, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOE_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert _cache_dirs("pretrain") == (str(tmp_path / "mine"), str(tmp_path / "mine/corpus"))


@pytest.mark.parametrize("config_name", PRIMARY)
def test_configs_resolve_the_same_dir_from_any_working_directory(xdg, tmp_path, monkeypatch,
                                                                 config_name):
    # Prepare: two unrelated working directories
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deeper").mkdir(parents=True)

    # Execute
    monkeypatch.chdir(tmp_path / "a")
    first = _cache_dirs(config_name)
    monkeypatch.chdir(tmp_path / "b" / "deeper")
    second = _cache_dirs(config_name)

    # Assert: an absolute path in the user cache, whatever the working directory
    assert first == second == (str(xdg / "fedmoe"), str(xdg / "fedmoe" / "corpus"))


def test_corpus_default_follows_the_cache_root(xdg):
    from fedmoe.data.corpus import _default_cache_dir

    assert _default_cache_dir() == xdg / "fedmoe" / "corpus"
