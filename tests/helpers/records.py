"""Flower-record helpers of the strategy and ServerApp tests."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

# A router weight key (decoder layer 1): its first dim indexes the routed experts.
ROUTER = "model.layers.1.mlp.gate.weight"


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


@contextmanager
def serverapp_identity():
    """The running task's identity Flower 1.42 stamps on new messages (set by its ServerApp
    runtime), for tests that build strategies' messages outside one; restored afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# --- a toy FedMoE round: one router, one shared tensor, two well-formed clients -----------------

SHARED = "model.layers.1.mlp.shared_expert.down_proj.weight"
EXPERT_ROWS = {ROUTER: 1}
GLOBAL_ROUTER = [[0, 0], [1, 1], [2, 2], [3, 3]]

# Two well-formed clients: A (node 1, client 10, 1 example), B (node 2, client 11, 3).
A_ROUTER, A_SHARED = [[1, 2], [3, 4], [5, 6], [7, 8]], [1, 1, 1]
B_ROUTER, B_SHARED = [[5, 6], [7, 8], [9, 10], [11, 12]], [5, 5, 5]
# (1 * A + 3 * B) / 4, by hand
AB_ROUTER, AB_SHARED = [[4, 5], [6, 7], [8, 9], [10, 11]], [4, 4, 4]


class FakeGrid(Grid):
    """A Grid that only knows its node ids (enough for FedAvg's sampling)."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return self.node_ids

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


def global_arrays() -> ArrayRecord:
    return ArrayRecord({ROUTER: Array(f32(GLOBAL_ROUTER)), SHARED: Array(f32([0, 0, 0]))})


def start_round(strategy, nodes=(1, 2, 3), server_round: int = 1) -> dict:
    """Run configure_train; return the sent instructions by destination node."""
    messages = strategy.configure_train(
        server_round, global_arrays(), ConfigRecord(), FakeGrid(list(nodes))
    )
    return {message.metadata.dst_node_id: message for message in messages}


def reply(instruction: Message, arrays: dict, metrics: dict, experts: dict | None = None):
    """The reply a ClientApp would send to ``instruction``."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord(metrics),
        }
    )
    if experts is not None:
        content["experts"] = ConfigRecord(experts)
    return Message(content, reply_to=instruction)


def good_replies(sent: dict) -> list[Message]:
    return [
        reply(
            sent[1],
            {ROUTER: f32(A_ROUTER), SHARED: f32(A_SHARED)},
            {"num-examples": 1, "client-id": 10, "train_loss": 2.0},
        ),
        reply(
            sent[2],
            {ROUTER: f32(B_ROUTER), SHARED: f32(B_SHARED)},
            {"num-examples": 3, "client-id": 11, "train_loss": 1.0},
        ),
    ]


def numpy_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}
