"""Replies that used to stop the server or own the model, and spoofed client ids, on the
real strategy with crafted reply Messages (as tests/fl/test_strategy.py)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmoe.fl.aggregate import cap_weights, reference_norm
from fedmoe.fl.strategy import FedMoE, FedMoEAdam
from tests.helpers.records import (
    A_ROUTER,
    A_SHARED,
    B_ROUTER,
    B_SHARED,
    EXPERT_ROWS,
    GLOBAL_ROUTER,
    ROUTER,
    SHARED,
    FakeGrid,
    f32,
    global_arrays,
    numpy_of,
    reply,
    start_round,
)

pytestmark = pytest.mark.usefixtures("serverapp_identity")


def good(instruction: Message, client: int, examples: int = 2) -> Message:
    return reply(instruction, {ROUTER: f32(A_ROUTER), SHARED: f32(A_SHARED)},
                 {"num-examples": examples, "client-id": client})


def raw(data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype="float32", shape=(3,), stype=stype, data=data)


def npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ones(3, np.float32))
    return buffer.getvalue()


# --- 4. no reply can crash the server -------------------------------------------------------

@pytest.mark.parametrize(("client_id", "reason"), [
    (float("inf"), "must be an integer, got inf"),
    (float("nan"), "must be an integer, got nan"),
    (1.5, "must be an integer, got 1.5"),
])
def test_a_client_id_that_is_not_an_integer_is_rejected(client_id, reason):
    # Prepare: node 2 claims a non-integer id (this raised OverflowError/ValueError before)
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy, nodes=(1, 2))
    bad = reply(sent[2], {ROUTER: f32(B_ROUTER), SHARED: f32(B_SHARED)},
                {"num-examples": 3, "client-id": client_id})
    # Execute
    arrays, _ = strategy.aggregate_train(1, [good(sent[1], 10), bad])
    metrics = strategy.aggregate_evaluate(1, [bad])
    # Assert: rejected under its node id; the good reply alone makes the global
    assert strategy.history[1].accepted == [10]
    assert reason in strategy.history[1].rejected[2]
    assert reason in strategy.history[1].eval_rejected[2] and metrics is None
    np.testing.assert_allclose(numpy_of(arrays)[ROUTER], A_ROUTER)


@pytest.mark.parametrize(("payload", "reason"), [
    (raw(b""), "could not be decoded: EOFError"),
    (raw(npz()), "is not a single numpy array"),
    (raw(b"\x93NUMPY\x01\x00"), "could not be decoded"),
    (raw(b"x", stype="torch.Tensor"), "could not be decoded: TypeError"),
])
def test_payloads_that_are_not_one_numpy_array_are_rejected(payload, reason):
    # Prepare
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy, nodes=(1, 2))
    arrays = ArrayRecord({ROUTER: Array(f32(B_ROUTER)), SHARED: payload})
    bad = Message(RecordDict({"arrays": arrays,
                              "metrics": MetricRecord({"num-examples": 3, "client-id": 11})}),
                  reply_to=sent[2])
    # Execute
    strategy.aggregate_train(1, [good(sent[1], 10), bad])
    # Assert
    assert reason in strategy.history[1].rejected[11]
    assert strategy.history[1].accepted == [10]


def test_metric_values_beyond_float64_are_rejected_not_raised():
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy, nodes=(1, 2))
    bad = reply(sent[2], {ROUTER: f32(B_ROUTER), SHARED: f32(B_SHARED)},
                {"num-examples": 3, "client-id": 11, "train_loss": float("inf")})
    strategy.aggregate_train(1, [good(sent[1], 10), bad])
    assert "metric 'train_loss' is not finite" in strategy.history[1].rejected[11]


# --- 5. weights and values cannot be hijacked -----------------------------------------------

def test_weight_cap_keeps_honest_imbalance_and_halves_a_huge_claim():
    shares = lambda w: (lambda c: c / c.sum())(cap_weights(w))  # noqa: E731
    np.testing.assert_allclose(shares([1, 3]), [0.25, 0.75])  # within 3x the median: kept
    np.testing.assert_allclose(shares([1e12, 64, 64, 64]), [0.5, 1 / 6, 1 / 6, 1 / 6])
    np.testing.assert_allclose(shares([1e308, 1e308, 1, 1]), [0.5, 0.5, 0, 0], atol=1e-12)
    np.testing.assert_allclose(shares([7]), [1.0])
    np.testing.assert_allclose(cap_weights([2, 1], None, None), [1.0, 0.5])  # off: as given


def test_reference_norm_is_the_lower_median():
    assert reference_norm([5.0, 1e30]) == 5.0
    assert reference_norm([3.0, 1.0, 2.0]) == 2.0
    assert reference_norm([4.0, 1.0, 3.0, 2.0]) == 2.0


def test_update_norm_bound_holds_with_two_replies():
    # Prepare: an honest reply and one 1000x away from the global tensors
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy, nodes=(1, 2))
    far = reply(sent[2], {ROUTER: f32(GLOBAL_ROUTER) + 1000, SHARED: f32([1000] * 3)},
                {"num-examples": 3, "client-id": 11})
    # Execute
    arrays, _ = strategy.aggregate_train(1, [good(sent[1], 10), far])
    # Assert
    assert "exceeds 10.0 x the round's (lower) median update norm" in \
        strategy.history[1].rejected[11]
    np.testing.assert_allclose(numpy_of(arrays)[ROUTER], A_ROUTER)


HUGE = {ROUTER: np.full((4, 2), 3e38, np.float32), SHARED: np.full(3, 3e38, np.float32)}


@pytest.mark.parametrize(("build", "arrays"), [
    (lambda: FedMoE(expert_rows=EXPERT_ROWS), HUGE),  # the mean is out of bounds
    (lambda: FedMoEAdam(expert_rows=EXPERT_ROWS, eta=1e6),  # the server's step is
     {ROUTER: f32(A_ROUTER), SHARED: f32(A_SHARED)}),
])
def test_an_out_of_bound_aggregate_never_becomes_the_global(build, arrays, caplog):
    # Prepare: a single reply (no norm to compare with)
    strategy = build()
    sent = start_round(strategy, nodes=(1, 2))
    only = reply(sent[1], arrays, {"num-examples": 1e12, "client-id": 10})
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmoe.fl.strategy"):
        new, _ = strategy.aggregate_train(1, [only])
    # Assert: no new global (Flower keeps the old one), and the round says why
    assert new is None
    assert "exceeds |x| <= 10000" in strategy.history[1].aggregate_rejected
    assert "stays out of the global model" in caplog.text


# --- 6. identity ----------------------------------------------------------------------------

def test_a_reply_claiming_another_nodes_client_id_is_rejected():
    # Prepare: node 1 is client 10; node 2 claims to be client 10 as well
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy, nodes=(1, 2))
    strategy.aggregate_train(1, [good(sent[1], 10)])
    sent = start_round(strategy, nodes=(1, 2), server_round=2)
    # Execute
    strategy.aggregate_train(2, [good(sent[1], 10), good(sent[2], 10, examples=50)])
    ev = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(
        2, global_arrays(), ConfigRecord(), FakeGrid([1, 2]))}
    strategy.aggregate_evaluate(2, [Message(RecordDict({"metrics": MetricRecord(
        {"num-examples": 1, "client-id": 10, "eval_ppl": 1.0})}), reply_to=ev[2])])
    # Assert: the impostor is rejected, named by its node id, in train and evaluate
    log = strategy.history[2]
    assert log.accepted == [10]
    assert log.rejected == {2: "client id 10 is bound to node 1, not to node 2"}
    assert log.eval_rejected == {2: "client id 10 is bound to node 1, not to node 2"}
    assert 10 not in log.eval_by_client


def test_a_client_id_passes_on_when_its_node_has_left():
    # Prepare: node 1 was client 10, then left; node 3 (a restart with a new id) claims 10
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy, nodes=(1, 2))
    strategy.aggregate_train(1, [good(sent[1], 10)])
    sent = start_round(strategy, nodes=(2, 3), server_round=2)
    # Execute
    strategy.aggregate_train(2, [good(sent[3], 10)])
    # Assert
    assert strategy.history[2].accepted == [10] and not strategy.history[2].rejected


# --- the evaluation a train reply carries (fl.evaluate_in_train) ----------------------------

def test_a_crafted_evaluation_in_a_train_reply_is_skipped_and_never_costs_the_update():
    # Prepare: rounds before round 3 evaluate in the train message; node 2 sends a non-finite
    # evaluation, node 3 one without a weight that claims to be client 10, node 4 puts text
    # in a ConfigRecord under the evaluation's name
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    strategy.evaluate_in_train_before = 3
    sent = start_round(strategy, nodes=(1, 2, 3, 4))
    replies = [good(sent[n], 10 * n) for n in (1, 2, 3, 4)]
    evaluations = {1: {"num-examples": 4, "eval_ppl": 5.0, "eval_loss": 1.6},
                   2: {"num-examples": 4, "eval_ppl": float("inf"), "eval_loss": 1.6},
                   3: {"eval_ppl": 1.0, "client-id": 10}}
    for node, metrics in evaluations.items():
        replies[node - 1].content["evaluation"] = MetricRecord(metrics)
    replies[3].content["evaluation"] = ConfigRecord({"note": "device text"})
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3, 4])) == []
    metrics = strategy.aggregate_evaluate(1, [])
    # Assert: every update is aggregated; only the honest evaluation counts, under the id its
    # train reply proved, and the bad ones are named
    log = strategy.history[1]
    assert log.accepted == [10, 20, 30, 40]
    assert log.eval_by_client == {10: evaluations[1]}
    assert "not finite" in log.eval_rejected[20] and "num-examples" in log.eval_rejected[30]
    assert 40 not in log.eval_rejected  # a ConfigRecord is no evaluation: ignored
    assert metrics["eval_ppl"] == 5.0
