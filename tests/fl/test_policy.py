"""The rules a device applies to the server's run config (fedmoe.fl.policy), on their own."""

from __future__ import annotations

import pytest

from fedmoe.client.guards import Refused
from fedmoe.fl.bridge import compose, device_config, to_run_config
from fedmoe.fl.policy import check_send_policy, device_overrides, send_roles
from fedmoe.moe.families import Role


def test_allowed_overrides_pass_and_the_servers_paths_are_dropped():
    overrides = ["experiment=smoke", "model=tiny_olmoe", "strategy=fedmoe", "train.lr=0.01",
                 "+train.lora.r=4", "prune.keep=0.5", "fl.num_rounds=3", "seed=3",
                 "strategy.dp.enabled=true", "model.config.num_experts=8",
                 "run_dir=/srv/run", "fl.base_model=/srv/base", "cache_dir=/srv/cache",
                 "fl.state_dir=/srv/state", "fl.audit_dir=/srv/audit", "model.path=/x",
                 "data.path=/etc/passwd", "logger.dir=/srv/wandb"]
    assert device_overrides(overrides) == overrides[:10]


@pytest.mark.parametrize(("override", "key", "why"), [
    ("model.family=${oc.env:HOME}", "model.family", "interpolations"),
    ("run_dir=${oc.env:HOME}", "run_dir", "interpolations"),  # even on a dropped key
    ("hydra.searchpath=[file:///etc]", "hydra.searchpath", "hydra.* keys"),
    ("hydra/launcher=basic", "hydra/launcher", "plain keys"),
    ("model=../../../etc/x", "model", "bare option name"),
    ("data=sub/dir", "data", "bare option name"),
    ("~model", "model", "bare option name"),
    ("model@fl=tiny", "model", "plain keys"),
    ("data.text_field=secret", "data.text_field", "not a key a device accepts"),
    ("+anything=1", "anything", "not a key a device accepts"),
    ("train.lr=0.1,0.2", "train.lr", "sweeps"),
])
def test_refused_overrides_name_the_key(override, key, why):
    with pytest.raises(Refused, match=rf"override '{key}' refused: .*{why}"):
        device_overrides(["experiment=smoke", override])


def test_a_device_composes_what_it_accepts_and_a_trusted_one_everything():
    run_config = to_run_config(["experiment=smoke", "fl.state_dir=/srv/state", "train.lr=0.5"])
    device = device_config(run_config, {})
    trusted = device_config(run_config, {"trust-run-config": True})
    assert device.fl.state_dir is None and device.train.lr == 0.5
    assert trusted.fl.state_dir == "/srv/state"


def test_send_policy():
    assert send_roles({}) == {Role.ROUTER, Role.SHARED_EXPERT}
    assert send_roles({"send-roles": "none"}) == frozenset()
    assert send_roles({"send-roles": "router"}) == {Role.ROUTER}
    with pytest.raises(ValueError, match="node config send-roles='experts'"):
        send_roles({"send-roles": "experts"})
    check_send_policy(["router"], {})  # asking for less is fine
    fedavg = compose(["strategy=fedavg"]).fl.aggregate
    with pytest.raises(Refused, match=r"asks for \['backbone', 'routed_experts'\]"):
        check_send_policy(fedavg, {})
    check_send_policy(fedavg, {"send-roles": "router,shared_expert,routed_experts,backbone"})


def test_a_server_asking_for_a_flex_graft_is_refused_by_the_device_and_the_schema():
    # A hostile run config asks a FLEx client for its personal graft: the device's send
    # policy refuses it even where every other role may leave, and validation names the key.
    from fedmoe.config import ConfigError, validate

    every_other = {"send-roles": "router,shared_expert,routed_experts,backbone"}
    with pytest.raises(Refused, match=r"asks for \['graft'\]"):
        check_send_policy(["backbone", "graft"], every_other)
    with pytest.raises(ConfigError, match="fl.aggregate names 'graft'"):
        validate(compose(["strategy=flex", "fl.aggregate=[backbone,graft]"]))
