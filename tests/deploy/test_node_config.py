"""What a SuperNode's node config does in the ClientApp, and the client-side DP clipping."""

from __future__ import annotations

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

from fedmoe.fl import client_app
from fedmoe.fl.bridge import to_run_config

pytestmark = pytest.mark.usefixtures("serverapp_identity")


def context(node_config: dict, *overrides: str, node_id: int = 123_456_789) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config=to_run_config(["experiment=smoke", *overrides]))


def test_memory_budget_of_a_device_sets_its_pruning_budget():
    # Execute
    plain = client_app._node_cfg(context({"partition-id": 0}))
    budgeted = client_app._node_cfg(context({"partition-id": 0, "memory-budget-mb": 6}))
    # Assert: only the device with a budget prunes, to that many MB of routed experts
    assert plain.prune.max_mb is None
    assert budgeted.prune.max_mb == 6.0
    assert budgeted.fl.aggregate == plain.fl.aggregate  # the rest is the run's config


def test_client_id_from_partition_id_else_from_the_node_id(caplog):
    assert client_app._client_id(context({"partition-id": 7})) == 7
    assert client_app._client_id(context({"data-path": "/x.jsonl"})) == 456_789
    assert "no partition-id" in caplog.text


def test_debug_delay_hook_sleeps_in_its_round_only(monkeypatch):
    # Prepare
    slept = []
    monkeypatch.setattr(client_app.time, "sleep", slept.append)
    slow = context({"partition-id": 1, "debug-delay-s": 2.5, "debug-delay-round": 2})
    # Execute
    for server_round in (1, 2, 3):
        client_app._debug_delay(slow, server_round)
    client_app._debug_delay(context({"partition-id": 0}), 2)
    # Assert
    assert slept == [2.5]


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


def test_dp_mod_clips_the_update_when_dp_is_on():
    # Execute
    on = client_app.dp_clipping_mod(train_message(1.0, 1.0),
                                    context({}, "strategy.dp.enabled=true"), local_training)
    off = client_app.dp_clipping_mod(train_message(1.0, None), context({}), local_training)
    # Assert: the update is scaled to norm 1 when DP is on, untouched when off
    np.testing.assert_allclose(on.content["arrays"]["w"].numpy() - 1.0, [0.6, 0.8, 0, 0],
                               rtol=1e-6)
    np.testing.assert_allclose(off.content["arrays"]["w"].numpy() - 1.0, [3, 4, 0, 0])
