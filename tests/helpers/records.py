"""Flower-record helpers of the strategy and ServerApp tests."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from flwr.common.constant import SUPERLINK_NODE_ID
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
