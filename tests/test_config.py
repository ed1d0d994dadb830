"""Structured configs (fedmoe/config.py): every preset validates, every mistake names its key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.core.config_store import ConfigStore

from fedmoe import config
from fedmoe.cli import main as fedmoe_main
from fedmoe.compose import conf_dir
from fedmoe.config import ConfigError, validate
from fedmoe.fl.bridge import compose
from tests.helpers.runs import child_env

CONF = conf_dir()


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "train", "strategy", "prune", "logger",
                                   "pretraining", "fl"])
def test_every_preset_of_every_group_validates(group, monkeypatch):
    # Strict: a preset key the schemas lack is an error here (at run time it only runs
    # unchecked), so a key added to conf/ without its schema entry fails this test.
    monkeypatch.setattr(config, "preset_keys", frozenset)
    for preset in _presets(group):
        extra = ["data.path=/some/file.jsonl"] if preset == "hf" else []
        overrides = [f"{group}={preset}", *extra]
        validate(compose(overrides))  # raises on any problem


@pytest.mark.parametrize(("override", "key", "allowed"), [
    ("strategy.rule=foo", "strategy.rule", "mean, median, trimmed_mean"),
    ("data.partition=shards", "data.partition", "natural, dirichlet, iid"),
    ("train.method=adam", "train.method", "full, lora"),
    ("fl.aggregate=[router,gate]", "fl.aggregate[1]", "router, shared_expert, routed_experts"),
    ("model.family=gpt2", "model.family", "qwen2_moe"),
    ("strategy.server_opt=sgd", "strategy.server_opt", "adam, yogi"),
    ("prune.score=magnitude", "prune.score", "frequency, tcess, reap"),
    ("fl.fraction_train=0", "fl.fraction_train=0", "(0, 1]"),
    ("fl.fraction_evaluate=1.5", "fl.fraction_evaluate=1.5", "in [0, 1]"),
    ("prune.keep=1.5", "prune.keep=1.5", "(0, 1]"),
    ("strategy.trim_beta=0.5", "strategy.trim_beta=0.5", "[0, 0.5)"),
    ("model.config.num_experts_per_tok=17", "model.config.num_experts_per_tok=17",
     "model.config.num_experts=16"),
    ("data.num_clients=0", "data.num_clients=0", ">= 1"),
    ("fl.min_available_nodes=9", "fl.min_available_nodes=9", "data.num_clients=8"),
    ("+fl.num_round=3", "fl.num_round", "num_rounds"),
    ("seed=abc", "seed", "Integer"),
    ("train.lr=fast", "train.lr", "Float"),
])
def test_a_wrong_value_names_the_key_and_what_is_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as error:
        validate(compose([override]))
    message = str(error.value)
    assert key in message and allowed in message, message


def test_logger_mode_is_checked():
    with pytest.raises(ConfigError, match=r"logger.mode.*auto, offline, online, disabled"):
        validate(compose(["logger=wandb", "logger.mode=cloud"]))


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as error:
        validate(compose(["strategy.rule=foo", "data.partition=x"]))
    assert "strategy.rule" in str(error.value) and "data.partition" in str(error.value)


@pytest.mark.parametrize("deployment", [False, True])
def test_dp_with_pruning_is_refused_in_simulation_and_deployment(deployment):
    with pytest.raises(ConfigError, match=r"strategy.dp.enabled=true needs full-size updates"):
        validate(compose(["strategy.dp.enabled=true", "prune.keep=0.5"]), deployment=deployment)
    validate(compose(["strategy.dp.enabled=true"]), deployment=deployment)  # DP alone: fine


def test_a_deployment_may_wait_for_more_nodes_than_partitions():
    overrides = ["data.num_clients=2", "fl.min_available_nodes=5"]
    with pytest.raises(ConfigError, match="the number of simulated clients"):
        validate(compose(overrides))
    validate(compose(overrides), deployment=True)  # its nodes are the SuperNodes that connect


def test_hf_data_needs_a_path():
    with pytest.raises(ConfigError, match="data.path is required"):
        validate(compose(["data=hf"]))


def test_choices_agree_with_the_presets_and_corpus():
    assert set(config.STRATEGY_NAMES) == set(_presets("strategy"))
    assert set(config.LOGGERS) == set(_presets("logger"))
    from fedmoe.data.corpus import ALL_DOMAINS  # the names data.domains' error lists

    assert ", ".join(ALL_DOMAINS) in config.RANGES["data.domains"][1]


def test_schemas_are_registered_with_hydra():
    repo = ConfigStore.instance().repo["schema"]
    assert {"model.yaml", "fl.yaml", "strategy.yaml", "data_embedded.yaml",
            "logger.yaml"} <= set(repo)


@pytest.mark.parametrize(("command", "override", "message"), [
    ("simulate", "pretraining.steps=0", "pretraining.steps=0: must be an integer >= 1"),
    ("pretrain", "pretraining.steps=0", "pretraining.steps=0: must be an integer >= 1"),
    ("prune", "prune.keep=1.5", "prune.keep=1.5: must be a fraction in (0, 1]"),
    ("analyze", "data.block_size=1", "data.block_size=1: must be an integer >= 2"),
    ("inspect", "model.dtype=float8", "model.dtype: Invalid value 'float8'"),
    ("edge generate", "edge.policy=mru", "edge.policy: Invalid value 'mru'"),
    ("edge bench", "edge.window=0", "edge.window=0: must be an integer >= 1"),
])
def test_every_command_checks_its_config_before_it_works(command, override, message, tmp_path,
                                                         monkeypatch):
    # Prepare: a bad value and an empty cache: every command but inspect would pretrain the
    # base model into it at once (the edge commands too, without model_dir)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDMOE_CACHE", str(cache))
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the CLI sets it for Hydra
    # Execute
    with pytest.raises(SystemExit) as stop:
        fedmoe_main([*command.split(), override, f"hydra.run.dir={tmp_path / 'run'}"])
    # Assert: a message naming the command and the key; nothing built
    assert str(stop.value.code).startswith(f"fedmoe {command}: invalid config:")
    assert message in str(stop.value.code)
    assert not cache.exists()


@pytest.mark.slow
def test_the_cli_process_prints_one_message_and_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "fedmoe.cli", "simulate", "pretraining.steps=0",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=child_env(tmp_path / "cache"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "pretraining.steps=0: must be an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_long_sweep_job_names_are_cut_with_a_hash():
    # Prepare: the override list of a job with many overrides (> 255 bytes as a file name)
    long = ",".join(f"data.key_{i}=value_{i}" for i in range(20))
    # Execute
    short, other = config.short_dirname(long), config.short_dirname(long + "x")
    # Assert: short enough, still readable, distinct per override list
    assert len(short) == config.MAX_DIRNAME and short.startswith("data.key_0=value_0")
    assert short != other and config.short_dirname("seed=0,strategy=local") == (
        "seed=0,strategy=local")


def test_a_preset_key_missing_from_the_schema_still_runs(monkeypatch):
    # Prepare: pretend conf/fl/default.yaml declares fl.new_knob (just added, no schema yet)
    keys = config.preset_keys() | {"fl.new_knob"}
    monkeypatch.setattr(config, "preset_keys", lambda: keys)
    # Execute / Assert: accepted; a typo in the same group still fails
    validate(compose(["+fl.new_knob=3"]))
    with pytest.raises(ConfigError, match="fl.new_knb: unknown key"):
        validate(compose(["+fl.new_knb=3"]))

