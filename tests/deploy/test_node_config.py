"""What a SuperNode's node config does in the ClientApp, and the client-side DP clipping."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedmoe.fl import client_app, client_task
from fedmoe.fl.bridge import to_run_config
from tests.helpers.runs import FAST

pytestmark = pytest.mark.usefixtures("serverapp_identity")


def context(node_config: dict, *overrides: str, node_id: int = 123_456_789) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config=to_run_config(["experiment=smoke", *overrides]))


def test_memory_budget_of_a_device_sets_its_pruning_budget():
    # Execute
    plain = client_task._node_cfg(context({"partition-id": 0}))
    budgeted = client_task._node_cfg(context({"partition-id": 0, "memory-budget-mb": 6}))
    # Assert: only the device with a budget prunes, to that many MB of routed experts
    assert plain.prune.max_mb is None
    assert budgeted.prune.max_mb == 6.0
    assert budgeted.fl.aggregate == plain.fl.aggregate  # the rest is the run's config


def test_client_id_from_partition_id_else_from_the_node_id(caplog):
    assert client_task._client_id(context({"partition-id": 7})) == 7
    assert client_task._client_id(context({"data-path": "/x.jsonl"})) == 456_789
    assert "no partition-id" in caplog.text


def train_message(global_value: float, clipping_norm: float | None) -> Message:
    config = {"server-round": 1} | ({"clipping_norm": clipping_norm} if clipping_norm else {})
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(4, global_value, np.float32))}),
                          "config": ConfigRecord(config)})
    return Message(content, dst_node_id=5, message_type=MessageType.TRAIN)


def local_training(msg: Message, _context: Context) -> Message:
    """A client whose update is [3, 4, 0, 0] (norm 5) away from the global tensors."""
    w = msg.content["arrays"]["w"].numpy() + np.array([3, 4, 0, 0], np.float32)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(w)}),
                          "metrics": MetricRecord({"num-examples": 1})})
    return Message(content, reply_to=msg)


def test_dp_mod_clips_the_update_when_the_instruction_carries_a_clipping_norm():
    # Execute: Flower's DP wrapper (strategy.dp.enabled) sends the norm with each instruction
    on = client_app.dp_clipping_mod(train_message(1.0, 1.0),
                                    context({}, "strategy.dp.enabled=true"), local_training)
    off = client_app.dp_clipping_mod(train_message(1.0, None), context({}), local_training)
    # Assert: the update is scaled to norm 1 when DP is on, untouched when off
    np.testing.assert_allclose(on.content["arrays"]["w"].numpy() - 1.0, [0.6, 0.8, 0, 0],
                               rtol=1e-6)
    np.testing.assert_allclose(off.content["arrays"]["w"].numpy() - 1.0, [3, 4, 0, 0])


def evaluate_message() -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    return Message(content, dst_node_id=5, message_type=MessageType.EVALUATE)


@pytest.mark.slow
def test_a_devices_base_model_is_the_checkpoint_its_client_loads(smoke_base, fedmoe_cache,
                                                                  tmp_path):
    # Prepare: the run names a base model that does not exist; each device names its own
    # copy, the second with a different output layer
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_base"
    shutil.copytree(smoke_base, other)
    weights = load_file(other / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 0.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    run = [*FAST, f"cache_dir={fedmoe_cache}", f"fl.base_model={tmp_path / 'nowhere'}"]

    def device(base: Path, name: str) -> Context:
        return context({"partition-id": 0, "base-model": str(base),
                        "state-dir": str(tmp_path / name)}, *run)

    # Execute: one evaluate message through the real ClientApp on each device
    first = client_app.app(evaluate_message(), device(smoke_base, "a"))
    second = client_app.app(evaluate_message(), device(other, "b"))
    # Assert: both ran on their own base model (the run's does not exist)
    ppl = [m.content["metrics"]["eval_ppl"] for m in (first, second)]
    assert all(1 < p < 512 for p in ppl)
    assert ppl[0] != pytest.approx(ppl[1], rel=1e-3)
    # Without its own copy a device never reads where the server points (fl.base_model is a
    # path: the device's own cache holds its base model, here the smoke base)
    third = client_app.app(evaluate_message(), context({"partition-id": 0}, *run))
    assert not third.has_error(), third.error.reason if third.has_error() else ""
    assert third.content["metrics"]["eval_ppl"] == pytest.approx(ppl[0], rel=1e-6)
