"""`fedmoe analyze` config composition and command wiring."""

from __future__ import annotations

from importlib import import_module

from fedmoe.analysis.pipeline import SECTIONS
from fedmoe.cli import COMMANDS
from fedmoe.compose import compose
from fedmoe.train.pretrain import base_checkpoint_dir


def _compose(*overrides: str):
    return compose("analyze", list(overrides))


def test_analyze_composes_pretrain_groups_analysis_and_cost():
    cfg = _compose("analysis=smoke", "analysis.cost.edge.memory_mb=512", "run_dir=/tmp/run")
    assert cfg.analysis.seq_len == 256 and list(cfg.analysis.sections) == list(SECTIONS)
    assert list(cfg.analysis.segment_lengths) == [4, 16, 64, 256]
    assert cfg.analysis.cost.edge.memory_mb == 512
    assert cfg.analysis.cost.reference.alpha == 0.5
    assert cfg.model_dir is None and cfg.run_dir == "/tmp/run"
    # the default model is the base checkpoint `fedmoe pretrain` writes for the same groups
    pretrain = compose("pretrain")
    assert base_checkpoint_dir(cfg) == base_checkpoint_dir(pretrain)


def test_analyze_command_is_registered():
    module, func = COMMANDS["analyze"].target.split(":")
    assert callable(getattr(import_module(module), func))
