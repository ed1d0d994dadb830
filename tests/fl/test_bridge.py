"""The one bridge between Hydra and Flower's run config round-trips."""

from __future__ import annotations

from flwr.common.config import get_fused_config_from_dir
from omegaconf import OmegaConf

from fedmoe.fl.bridge import (
    RUN_CONFIG_KEY,
    compose,
    config_from_run_config,
    overrides_from_run_config,
    to_run_config,
)
from fedmoe.fl.simulation import _write_app_dir, simulation_overrides

OVERRIDES = [
    "experiment=smoke",
    "strategy=fedavg",
    "fl.num_rounds=3",
    "train.lr=0.002",
    "fl.aggregate=[router,shared_expert]",
    "run_dir='/tmp/a dir/with spaces'",
]


def test_round_trip_through_run_config():
    # Prepare
    direct = compose(OVERRIDES)
    # Execute
    run_config = to_run_config(OVERRIDES)
    via_flower = config_from_run_config(run_config)
    # Assert: scalar run config, same overrides back, same resolved config
    assert list(run_config) == [RUN_CONFIG_KEY] and isinstance(run_config[RUN_CONFIG_KEY], str)
    assert overrides_from_run_config(run_config) == OVERRIDES
    assert OmegaConf.to_container(via_flower, resolve=True) == OmegaConf.to_container(
        direct, resolve=True
    )
    assert via_flower.fl.num_rounds == 3 and via_flower.run_dir == "/tmp/a dir/with spaces"
    assert via_flower.strategy.name == "fedavg" and via_flower.data.num_clients == 4


def test_round_trip_through_a_flower_app_directory(tmp_path):
    # The run config Flower fuses from [tool.flwr.app.config] (what `flwr run` reads)
    run_config = to_run_config(OVERRIDES)
    _write_app_dir(tmp_path, run_config)
    fused = get_fused_config_from_dir(tmp_path, {})
    assert fused[RUN_CONFIG_KEY] == run_config[RUN_CONFIG_KEY]
    assert config_from_run_config(fused) == config_from_run_config(run_config)


def test_empty_run_config_gives_the_defaults():
    cfg = config_from_run_config({})
    assert cfg.strategy.name == "fedmoe" and list(cfg.fl.aggregate) == ["router", "shared_expert"]


def test_launch_overrides_replace_user_values(tmp_path):
    cfg = compose(["experiment=smoke"])
    out = simulation_overrides(cfg, ["run_dir=/old", "fl.num_rounds=2"], tmp_path, tmp_path / "b")
    assert out == ["fl.num_rounds=2", f"run_dir={tmp_path}", f"fl.base_model={tmp_path / 'b'}",
                   f"fl.state_dir={tmp_path / 'clients'}"]
