"""The device's side of the trust boundary, on the real ClientApp (its mods included).

Each test hands ``fedmoe.fl.client_app.app`` a train or evaluate Message and a Flower Context
as a SuperNode would: the run config the server chose, the node config the device chose. The
server's instruction is the attack: routed experts asked for, device secrets probed through
interpolations, config files and error messages, paths redirected, bad global tensors sent.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedmoe.checkpoints import load_model
from fedmoe.client.state import PersonalStore
from fedmoe.fl import client_app
from fedmoe.fl.bridge import compose, to_run_config
from fedmoe.fl.server_app import initial_arrays
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role

pytestmark = pytest.mark.slow

SECRET = "zebra-quartz-7731"  # a value only the device holds
ROUTED = ".mlp.experts."


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@pytest.fixture(scope="module")
def global_arrays(base_model) -> dict[str, np.ndarray]:
    """What the server sends with the default strategy: router and shared-expert tensors."""
    arrays, _, _, _ = initial_arrays(compose(["experiment=smoke", f"fl.base_model={base_model}"]))
    return {k: v.numpy() for k, v in arrays.items()}


def instruction(arrays: dict[str, np.ndarray], server_round: int = 1,
                kind: str = MessageType.TRAIN) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                 for k, v in arrays.items()}),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=7, message_type=kind)


def device(tmp: Path, base_model: Path, *overrides: str, **node) -> Context:
    """A device with its own state dir and base model, running the server's ``overrides``."""
    node_config = {"partition-id": 0, "state-dir": str(tmp / "state"),
                   "base-model": str(base_model)} | node
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=to_run_config(["experiment=smoke", "train.local_steps=1",
                                             "fl.export=false", *overrides]))


def state_file(tmp: Path) -> Path:
    return tmp / "state" / "client_0000" / "personal.safetensors"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def trained(tmp_path, base_model, global_arrays, device_cache) -> Path:
    """A device that trained one round under the default policy (its personal state saved)."""
    reply = client_app.app(instruction(global_arrays), device(tmp_path, base_model))
    assert not reply.has_error(), reply.error
    return tmp_path


# --- 1. the device owns its privacy policy --------------------------------------------------

@pytest.mark.parametrize("ask", [["strategy=fedavg"],
                                 ["fl.aggregate=[router,shared_expert,routed_experts]"]])
def test_a_run_asking_for_routed_experts_is_refused_and_the_state_kept(
        trained, base_model, global_arrays, ask):
    # Prepare
    before = digest(state_file(trained))
    # Execute: round 2 asks for the routed experts
    reply = client_app.app(instruction(global_arrays, 2), device(trained, base_model, *ask))
    # Assert: an error reply that says why; no tensor left; the personal state unchanged
    assert reply.has_error() and not reply.has_content()
    assert reply.error.reason.startswith("refused: privacy policy")
    assert "routed_experts" in reply.error.reason and "send-roles" in reply.error.reason
    assert digest(state_file(trained)) == before


def test_a_device_that_allows_more_sends_it(tmp_path, base_model, device_cache):
    # Prepare: fedavg's global tensors; this device's policy lets every role leave
    cfg = compose(["experiment=smoke", "strategy=fedavg", f"fl.base_model={base_model}"])
    arrays = {k: v.numpy() for k, v in initial_arrays(cfg)[0].items()}
    context = device(tmp_path, base_model, "strategy=fedavg",
                     **{"send-roles": "router,shared_expert,routed_experts,backbone"})
    # Execute
    reply = client_app.app(instruction(arrays), context)
    # Assert: the routed experts travel, as the device allowed
    assert not reply.has_error(), reply.error
    assert any(ROUTED in k for k in reply.content["arrays"])


def test_a_config_training_fewer_roles_never_shrinks_the_personal_state(
        trained, base_model, global_arrays):
    # Before: the saved personal tensors were the trained ones not sent, so a config training
    # the router only saved no routed expert at all.
    # Prepare
    first, _ = PersonalStore(trained / "state" / "client_0000").load()
    assert any(ROUTED in k for k in first)
    router_only = {k: v for k, v in global_arrays.items() if ".mlp.gate." in k}
    # Execute: round 2 trains (and so sends and aggregates) the router only, an allowed key
    reply = client_app.app(instruction(router_only, 2),
                           device(trained, base_model, "train.trainable=[router]"))
    # Assert: every routed-expert tensor is still there, as it was
    assert not reply.has_error(), reply.error
    second, meta = PersonalStore(trained / "state" / "client_0000").load()
    assert meta.rounds == 2
    for name, value in first.items():
        if ROUTED in name:
            assert torch.equal(second[name], value), name


# --- 2. server config is data, not code -----------------------------------------------------

def probes(tmp: Path) -> dict[str, list[str]]:
    """Overrides that made a device leak or obey before: each must be refused."""
    evil = tmp / "evil"
    evil.mkdir(exist_ok=True)
    (evil / "leak.yaml").write_text(f"family: {SECRET}\n")
    return {
        "env interpolation": ["model.family=${oc.env:FEDMOE_SECRET}"],
        "quoted interpolation": ["model.family='${oc.env:FEDMOE_SECRET}'"],
        "nested interpolation": ["fl.aggregate=[router,'${oc.env:FEDMOE_SECRET}']"],
        "group value with ../": [f"model=../../../../../../../..{evil}/leak"],
        "hydra search path": [f"hydra.searchpath=[file://{evil}]"],
        "text field probe": ["data.text_field=secret_col"],
        "unknown key": ["+fl.anything=1"],
        "@package": ["model@train=tiny"],
    }


@pytest.mark.parametrize("probe", list(probes(Path("/tmp"))))
def test_overrides_that_leaked_device_data_are_refused_naming_the_key(
        tmp_path, base_model, global_arrays, monkeypatch, probe):
    # Prepare
    monkeypatch.setenv("FEDMOE_SECRET", SECRET)
    overrides = probes(tmp_path)[probe]
    key = overrides[0].split("=", 1)[0].lstrip("+").split("@")[0]
    # Execute
    reply = client_app.app(instruction(global_arrays), device(tmp_path, base_model, *overrides))
    # Assert: refused, naming the key; no secret in the reply; nothing written
    assert reply.has_error()
    assert reply.error.reason.startswith("refused: server config"), reply.error.reason
    assert repr(key) in reply.error.reason
    assert SECRET not in reply.error.reason
    assert not (tmp_path / "state").exists()


def test_the_servers_paths_do_not_steer_the_device(tmp_path, base_model, global_arrays,
                                                   device_cache):
    # Prepare: the run config names server-side paths (and a file of the device to read)
    server = tmp_path / "server"
    overrides = [f"fl.state_dir={server / 'state'}", f"fl.audit_dir={server / 'audit'}",
                 f"cache_dir={server / 'cache'}", f"fl.base_model={server / 'base'}",
                 f"model.path={server / 'base'}", "data.path=/etc/passwd",
                 f"run_dir={server / 'run'}"]
    # Execute
    reply = client_app.app(instruction(global_arrays), device(tmp_path, base_model, *overrides))
    # Assert: the device trained from its own base model into its own state dir only
    assert not reply.has_error(), reply.error
    assert state_file(tmp_path).exists()
    assert not server.exists()


def test_one_trust_domain_applies_the_servers_paths(tmp_path, base_model, global_arrays,
                                                     device_cache):
    # Prepare: `fedmoe simulate`'s node config; the run config names the audit dir
    context = device(tmp_path, base_model, f"fl.audit_dir={tmp_path / 'audit'}",
                     **{"trust-run-config": True})
    # Execute
    reply = client_app.app(instruction(global_arrays), context)
    # Assert
    assert not reply.has_error(), reply.error
    assert (tmp_path / "audit" / "client_0.jsonl").exists()


# --- 3. error replies carry no device data --------------------------------------------------

def test_a_failing_client_tells_the_server_a_category_only(tmp_path, base_model, global_arrays,
                                                           device_cache, caplog):
    # Prepare: the device's data file has no text column (its reading error lists columns)
    data = tmp_path / "notes.csv"
    data.write_text(f"secret_col\n{SECRET}\n")
    context = device(tmp_path, base_model, **{"data-path": str(data)})
    # Execute
    with caplog.at_level(logging.ERROR, logger="fedmoe.fl.mods"):
        reply = client_app.app(instruction(global_arrays), context)
    # Assert: a fixed message to the server; the detail (columns, path) in the device's log
    assert reply.error.reason == "failed: the client failed; the details are in the device's log"
    assert "secret_col" in caplog.text and str(data) in caplog.text


# --- 5. a client refuses a bad global and never keeps non-finite tensors --------------------

@pytest.mark.parametrize(("damage", "reason"), [
    ("nan", "non-finite values"),
    ("huge", "exceeds |x| <= 10000"),
    ("routed expert", "not ones this device aggregates"),
    ("shape", "has shape"),
])
def test_a_bad_global_is_refused_and_the_state_kept(trained, base_model, global_arrays,
                                                    damage, reason):
    # Prepare
    before = digest(state_file(trained))
    arrays = dict(global_arrays)
    name = next(iter(arrays))
    if damage == "nan":
        arrays[name] = np.full_like(arrays[name], np.nan)
    elif damage == "huge":
        arrays[name] = np.full_like(arrays[name], 3e38)
    elif damage == "shape":
        arrays[name] = arrays[name][:1]
    else:
        model = load_model(compose(["experiment=smoke"]).model, checkpoint=base_model)
        adapter = MoEAdapter(model)
        expert = next(n for n, _ in model.named_parameters()
                      if adapter.role_of(n) == Role.ROUTED_EXPERTS)
        arrays[expert] = dict(model.named_parameters())[expert].detach().numpy() + 1.0
    # Execute: a train and an evaluate message with it
    replies = [client_app.app(instruction(arrays, 2, kind), device(trained, base_model))
               for kind in (MessageType.TRAIN, MessageType.EVALUATE)]
    # Assert
    for reply in replies:
        assert reply.has_error() and reply.error.reason.startswith("refused: global tensor")
        assert reason in reply.error.reason
    assert digest(state_file(trained)) == before


def test_training_that_diverges_saves_and_sends_nothing(trained, base_model, global_arrays):
    # Prepare: the server asks for a learning rate that blows the weights up (then NaN losses)
    before = digest(state_file(trained))
    # Execute
    reply = client_app.app(instruction(global_arrays, 2),
                           device(trained, base_model, "train.lr=1e30", "train.local_steps=3"))
    # Assert: reported, the last good personal state kept (and finite)
    assert reply.error.reason.startswith("diverged: ")
    assert digest(state_file(trained)) == before
    tensors, meta = PersonalStore(trained / "state" / "client_0000").load()
    assert meta.rounds == 1
    assert all(torch.isfinite(v).all() for v in tensors.values())
