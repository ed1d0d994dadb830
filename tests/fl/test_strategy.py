"""FedMoE strategy on real Flower messages and records."""

import logging

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg

from fedmoe.fl.strategy import FedMoE, FedMoEAdam, FedMoEYogi, build_strategy
from tests.helpers.records import (
    A_ROUTER,
    A_SHARED,
    AB_ROUTER,
    AB_SHARED,
    B_ROUTER,
    B_SHARED,
    EXPERT_ROWS,
    GLOBAL_ROUTER,
    ROUTER,
    SHARED,
    FakeGrid,
    f32,
    global_arrays,
    good_replies,
    numpy_of,
    reply,
    start_round,
)

pytestmark = pytest.mark.usefixtures("serverapp_identity")

def test_aggregate_is_the_hand_computed_weighted_mean():
    # Prepare
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy, nodes=(1, 2))

    # Execute
    arrays, metrics = strategy.aggregate_train(1, good_replies(sent))

    # Assert
    out = numpy_of(arrays)
    np.testing.assert_allclose(out[ROUTER], AB_ROUTER)
    np.testing.assert_allclose(out[SHARED], AB_SHARED)
    assert out[ROUTER].dtype == np.float32
    assert metrics["train_loss"] == pytest.approx((1 * 2.0 + 3 * 1.0) / 4)
    assert "client-id" not in metrics
    assert strategy.history[1].accepted == [10, 11]


def test_equals_flower_fedavg_when_everyone_holds_every_expert():
    # Prepare
    strategy, fedavg = FedMoE(expert_rows=EXPERT_ROWS), FedAvg()
    replies = good_replies(start_round(strategy, nodes=(1, 2)))

    # Execute
    ours, _ = strategy.aggregate_train(1, replies)
    theirs, _ = fedavg.aggregate_train(1, replies)

    # Assert
    for key, value in numpy_of(theirs).items():
        np.testing.assert_allclose(numpy_of(ours)[key], value, rtol=1e-6)


def test_router_rows_average_over_the_clients_holding_them():
    # Prepare: A holds experts {0, 1}, B holds {1, 2}; nobody holds expert 3
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy, nodes=(1, 2))
    replies = [
        reply(
            sent[1],
            {ROUTER: f32([[1, 2], [3, 4]]), SHARED: f32(A_SHARED)},
            {"num-examples": 1, "client-id": 10},
            experts={"1": [0, 1]},
        ),
        reply(
            sent[2],
            {ROUTER: f32([[7, 8], [9, 10]]), SHARED: f32(B_SHARED)},
            {"num-examples": 3, "client-id": 11},
            experts={"1": [1, 2]},
        ),
    ]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: row 1 = (1*[3,4] + 3*[7,8]) / 4; row 3 keeps the global [3, 3]
    np.testing.assert_allclose(numpy_of(arrays)[ROUTER], [[1, 2], [6, 7], [9, 10], [3, 3]])
    np.testing.assert_allclose(numpy_of(arrays)[SHARED], AB_SHARED)


def test_disjoint_expert_subsets():
    # Prepare
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy, nodes=(1, 2))
    replies = [
        reply(
            sent[1],
            {ROUTER: f32([[1, 2], [3, 4]]), SHARED: f32(A_SHARED)},
            {"num-examples": 1, "client-id": 10},
            experts={"1": [0, 1]},
        ),
        reply(
            sent[2],
            {ROUTER: f32([[9, 10], [11, 12]]), SHARED: f32(B_SHARED)},
            {"num-examples": 3, "client-id": 11},
            experts={"1": [2, 3]},
        ),
    ]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    np.testing.assert_allclose(numpy_of(arrays)[ROUTER], [[1, 2], [3, 4], [9, 10], [11, 12]])


def _bad_content(kind: str) -> tuple[dict, dict, dict | None]:
    """Arrays, metrics and experts of a reply from client 12 that is malformed by kind."""
    router, shared = f32(np.full((4, 2), 0.5)), f32([0.5, 0.5, 0.5])
    arrays = {ROUTER: router, SHARED: shared}
    metrics = {"num-examples": 5, "client-id": 12, "train_loss": 0.1}
    experts = None
    if kind == "missing key":
        del arrays[SHARED]
    elif kind == "unknown key":
        arrays["model.layers.0.mlp.gate.weight"] = router
    elif kind == "wrong shape":
        arrays[ROUTER] = f32(np.ones((3, 2)))
    elif kind == "wrong dtype":
        arrays[ROUTER] = router.astype(np.float64)
    elif kind == "nan":
        arrays[SHARED] = f32([0, np.nan, 0])
    elif kind == "inf":
        arrays[ROUTER] = f32([[np.inf, 0]] * 4)
    elif kind == "num-examples missing":
        del metrics["num-examples"]
    elif kind == "bad experts record":
        experts = {"1": [3, 0]}
        arrays[ROUTER] = f32(np.ones((2, 2)))
    elif kind == "huge update norm":
        arrays[ROUTER] = f32(np.full((4, 2), 1e4))
    return arrays, metrics, experts


@pytest.mark.parametrize(
    ("kind", "reason_part"),
    [
        ("missing key", f"missing ['{SHARED}']"),
        ("unknown key", "unknown ['model.layers.0.mlp.gate.weight']"),
        ("wrong shape", "shape (3, 2), expected (4, 2)"),
        ("wrong dtype", "dtype float64"),
        ("nan", "non-finite"),
        ("inf", "non-finite"),
        ("num-examples missing", "num-examples"),
        ("bad experts record", "sorted and unique"),
        ("huge update norm", "update norm"),
    ],
)
def test_a_malformed_reply_is_rejected_and_the_rest_aggregated(kind, reason_part, caplog):
    # Prepare
    strategy = FedMoE(expert_rows=EXPERT_ROWS, max_update_norm=5.0)
    sent = start_round(strategy)
    bad = reply(sent[3], *_bad_content(kind))

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmoe.fl.strategy"):
        arrays, _ = strategy.aggregate_train(1, [*good_replies(sent), bad])

    # Assert
    log = strategy.history[1]
    assert list(log.rejected) == [12] and reason_part in log.rejected[12]
    assert log.accepted == [10, 11]
    assert "client 12 (node 3)" in caplog.text and reason_part in caplog.text
    np.testing.assert_allclose(numpy_of(arrays)[ROUTER], AB_ROUTER)
    np.testing.assert_allclose(numpy_of(arrays)[SHARED], AB_SHARED)


def test_error_reply_is_rejected_by_node_id():
    # Prepare
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy)
    failed = Message(Error(code=0, reason="client crashed"), reply_to=sent[3])

    # Execute
    arrays, _ = strategy.aggregate_train(1, [*good_replies(sent), failed])

    # Assert: no client-id in an error reply, so the node id names it
    assert strategy.history[1].rejected == {3: "error reply: client crashed"}
    np.testing.assert_allclose(numpy_of(arrays)[ROUTER], AB_ROUTER)


def test_superlinks_error_reply_for_a_dead_node_names_that_nodes_client():
    # Prepare: round 1, node 3 replies as client 12; round 2, node 3 has died and the
    # SuperLink answers its instruction itself (source: the SuperLink's node id)
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy, nodes=(7, 8, 9))
    first = reply(sent[9], {ROUTER: f32(A_ROUTER), SHARED: f32(A_SHARED)},
                  {"num-examples": 1, "client-id": 12})
    strategy.aggregate_train(1, [first])
    sent = start_round(strategy, nodes=(7, 8, 9), server_round=2)
    for message in sent.values():  # what the grid does when it pushes them
        message.metadata.__dict__["_message_id"] = message.object_id
    dead = Message(Error(code=0, reason="node unavailable"), reply_to=sent[9])
    dead.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    assert dead.metadata.src_node_id == SUPERLINK_NODE_ID

    # Execute
    strategy.aggregate_train(2, [dead])

    # Assert
    assert strategy.history[2].rejected == {12: "error reply: node unavailable"}


def test_nothing_accepted_returns_none():
    # Prepare
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy)
    bad = reply(sent[3], *_bad_content("nan"))

    # Execute
    result = strategy.aggregate_train(1, [bad])

    # Assert
    assert result == (None, None)


def test_median_rule_through_messages():
    # Prepare: three clients holding every expert; the median ignores the weights
    strategy = FedMoE(expert_rows=EXPERT_ROWS, rule="median")
    sent = start_round(strategy)
    values = {1: 1.0, 2: 9.0, 3: 2.0}
    replies = [
        reply(
            sent[n],
            {ROUTER: f32(np.full((4, 2), v)), SHARED: f32([v, v, v])},
            {"num-examples": 100 if n == 2 else 1, "client-id": n},
        )
        for n, v in values.items()
    ]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    np.testing.assert_allclose(numpy_of(arrays)[ROUTER], np.full((4, 2), 2.0))


def test_fedadam_step_runs_on_the_masked_mean():
    # Prepare: A holds {0, 1}, B holds {1, 2}; expert 3 is held by nobody
    strategy = build_strategy(
        server_opt="adam", expert_rows=EXPERT_ROWS, eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3
    )
    sent = start_round(strategy, nodes=(1, 2))
    replies = [
        reply(
            sent[1],
            {ROUTER: f32([[1, 2], [3, 4]]), SHARED: f32(A_SHARED)},
            {"num-examples": 1, "client-id": 10},
            experts={"1": [0, 1]},
        ),
        reply(
            sent[2],
            {ROUTER: f32([[7, 8], [9, 10]]), SHARED: f32(B_SHARED)},
            {"num-examples": 3, "client-id": 11},
            experts={"1": [1, 2]},
        ),
    ]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: Flower's FedAdam formula (round 1, zero moments) applied to the masked mean
    masked_mean = f32([[1, 2], [6, 7], [9, 10], [3, 3]])
    delta = masked_mean - f32(GLOBAL_ROUTER)
    m_t, v_t = 0.1 * delta, 0.01 * delta**2
    eta_norm = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    expected = f32(GLOBAL_ROUTER) + eta_norm * m_t / (np.sqrt(v_t) + 1e-3)
    np.testing.assert_allclose(numpy_of(arrays)[ROUTER], expected, rtol=1e-5)
    np.testing.assert_allclose(numpy_of(arrays)[ROUTER][3], [3, 3])  # zero pseudo-gradient
    assert numpy_of(arrays)[ROUTER].dtype == np.float32  # FedAdam alone gives float64


def test_fedyogi_takes_the_hand_computed_steps_over_two_rounds():
    # Prepare: FedYogi (no bias correction; v_t moves by sign(v - delta^2)), as Flower
    # defines it, over FedMoE's masked mean; round 1 as in the FedAdam test above
    eta, beta_1, beta_2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = build_strategy(server_opt="yogi", expert_rows=EXPERT_ROWS, eta=eta,
                              beta_1=beta_1, beta_2=beta_2, tau=tau)
    sent = start_round(strategy, nodes=(1, 2))
    first = [
        reply(sent[1], {ROUTER: f32([[1, 2], [3, 4]]), SHARED: f32(A_SHARED)},
              {"num-examples": 1, "client-id": 10}, experts={"1": [0, 1]}),
        reply(sent[2], {ROUTER: f32([[7, 8], [9, 10]]), SHARED: f32(B_SHARED)},
              {"num-examples": 3, "client-id": 11}, experts={"1": [1, 2]}),
    ]
    # Execute: round 1, then round 2 from its result with every expert held
    after_1 = numpy_of(strategy.aggregate_train(1, first)[0])
    messages = strategy.configure_train(
        2, ArrayRecord({k: Array(v) for k, v in after_1.items()}), ConfigRecord(),
        FakeGrid([1, 2]))
    sent = {m.metadata.dst_node_id: m for m in messages}
    second = good_replies(sent)
    after_2 = numpy_of(strategy.aggregate_train(2, second)[0])
    # Assert: by hand, for the router
    g0 = f32(GLOBAL_ROUTER).astype(np.float64)
    d1 = f32([[1, 2], [6, 7], [9, 10], [3, 3]]) - g0  # masked mean - global
    m1, v1 = (1 - beta_1) * d1, (1 - beta_2) * d1**2  # v0 = 0: sign(0 - d^2) = -1
    g1 = g0 + eta * m1 / (np.sqrt(v1) + tau)
    d2 = f32(AB_ROUTER) - g1.astype(np.float32)
    m2 = beta_1 * m1 + (1 - beta_1) * d2
    v2 = v1 - (1 - beta_2) * d2**2 * np.sign(v1 - d2**2)
    g2 = g1.astype(np.float32) + eta * m2 / (np.sqrt(v2) + tau)
    np.testing.assert_allclose(after_1[ROUTER], g1, rtol=1e-5)
    np.testing.assert_allclose(after_1[ROUTER][3], [3, 3])  # nobody held expert 3
    np.testing.assert_allclose(after_2[ROUTER], g2, rtol=1e-5)
    assert after_2[ROUTER].dtype == np.float32
    # FedAdam (bias-corrected, v_t an EMA) would step elsewhere in round 2
    v2_adam = beta_2 * v1 + (1 - beta_2) * d2**2
    eta_2 = eta * np.sqrt(1 - beta_2**2) / (1 - beta_1**2)
    adam = g1.astype(np.float32) + eta_2 * m2 / (np.sqrt(v2_adam) + tau)
    assert not np.allclose(after_2[ROUTER], adam, rtol=1e-3)


def test_server_optimizers_compose_by_mro():
    # Execute
    adam = build_strategy(server_opt="adam", expert_rows=EXPERT_ROWS, rule="trimmed_mean")
    yogi = build_strategy(server_opt="yogi", expert_rows=EXPERT_ROWS, eta=0.5)

    # Assert
    names = [cls.__name__ for cls in FedMoEAdam.__mro__]
    order = [names.index(n) for n in ("FedMoEAdam", "FedAdam", "FedOpt", "FedMoE", "FedAvg")]
    assert order == sorted(order)
    assert isinstance(yogi, FedMoEYogi) and yogi.eta == 0.5
    assert adam.rule == "trimmed_mean" and adam.expert_rows == EXPERT_ROWS
    start_round(adam, nodes=(1, 2))
    assert set(adam.current_arrays) == {ROUTER, SHARED}  # FedOpt's bookkeeping still runs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"server_opt": "sgd"}, r"strategy.server_opt .*'adam', 'yogi'.*'sgd'"),
        ({"rule": "mode"}, r"strategy.rule .*'mean', 'median', 'trimmed_mean'"),
        ({"name": "fedprox"}, r"strategy.name .*'fedmoe'"),
        ({"trim_beta": 0.5}, r"strategy.trim_beta"),
    ],
)
def test_bad_settings_name_the_config_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_strategy(expert_rows=EXPERT_ROWS, **kwargs)


def test_expert_rows_is_required():
    with pytest.raises(TypeError, match="expert_rows"):
        FedMoE()


def test_history_counts_bytes_both_ways():
    # Prepare: 3 nodes sampled; node 3 sends a malformed (rejected) reply
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    sent = start_round(strategy)
    bad_arrays, bad_metrics, _ = _bad_content("nan")
    replies = [*good_replies(sent), reply(sent[3], bad_arrays, bad_metrics)]

    # Execute
    strategy.aggregate_train(1, replies)
    strategy.configure_evaluate(1, global_arrays(), ConfigRecord(), FakeGrid([1, 2]))

    # Assert: global payload is (4*2 + 3) float32 = 44 bytes
    log = strategy.history[1]
    assert log.bytes_down == 44 * 3 + 44 * 2
    assert log.bytes_down_eval == 44 * 2
    assert log.bytes_up_by_client == {10: 44, 11: 44, 12: 44}
    assert log.bytes_up == 132


def test_evaluate_skips_bad_replies_and_keeps_per_client_ppl(caplog):
    # Prepare
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    start_round(strategy)
    sent = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_evaluate(
            1, global_arrays(), ConfigRecord(), FakeGrid([1, 2, 3])
        )
    }
    replies = [
        Message(
            RecordDict(
                {
                    "metrics": MetricRecord(
                        {"num-examples": 1, "client-id": 10, "eval_loss": 2.0, "eval_ppl": 7.0}
                    )
                }
            ),
            reply_to=sent[1],
        ),
        Message(
            RecordDict(
                {
                    "metrics": MetricRecord(
                        {
                            "num-examples": 3,
                            "client-id": 11,
                            "eval_loss": 1.0,
                            "eval_ppl": 3.0,
                            "eval_acc": 0.5,
                        }
                    )
                }
            ),
            reply_to=sent[2],
        ),
        Message(
            RecordDict({"metrics": MetricRecord({"client-id": 12, "eval_loss": 0.0})}),
            reply_to=sent[3],
        ),
    ]

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmoe.fl.strategy"):
        metrics = strategy.aggregate_evaluate(1, replies)

    # Assert: different keys are averaged over their reporters
    assert metrics["eval_loss"] == pytest.approx((1 * 2.0 + 3 * 1.0) / 4)
    assert metrics["eval_acc"] == pytest.approx(0.5)
    log = strategy.history[1]
    assert {c: m["eval_ppl"] for c, m in log.eval_by_client.items()} == {10: 7.0, 11: 3.0}
    assert {c: m["num-examples"] for c, m in log.eval_by_client.items()} == {10: 1, 11: 3}
    assert list(log.eval_rejected) == [12] and "client 12 (node 3)" in caplog.text
    assert log.wall_s > 0


def _evaluate_replies(strategy: FedMoE, metrics: dict[int, dict]) -> list[Message]:
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(
        1, global_arrays(), ConfigRecord(), FakeGrid(sorted(metrics)))}
    return [Message(RecordDict({"metrics": MetricRecord(m)}), reply_to=sent[n])
            for n, m in metrics.items()]


def test_list_valued_metrics_are_averaged_element_wise():
    # Prepare: the same keys (Flower's aggregation), then different keys (fedmoe's per-key
    # mean), where a list of another length cannot be averaged and is left out
    strategy = FedMoE(expert_rows=EXPERT_ROWS)
    start_round(strategy)
    same = _evaluate_replies(strategy, {
        1: {"num-examples": 1, "client-id": 10, "eval_loss": 2.0, "per_layer": [1.0, 2.0]},
        2: {"num-examples": 3, "client-id": 11, "eval_loss": 1.0, "per_layer": [5.0, 6.0]}})
    different = _evaluate_replies(strategy, {
        1: {"num-examples": 1, "client-id": 10, "per_layer": [1.0, 2.0], "odd": [1.0]},
        2: {"num-examples": 3, "client-id": 11, "per_layer": [5.0, 6.0], "odd": [1.0, 2.0]},
        3: {"num-examples": 4, "client-id": 12, "eval_loss": 1.0}})
    # Execute
    first = strategy.aggregate_evaluate(1, same)
    second = strategy.aggregate_evaluate(1, different)
    # Assert: weights 1 and 3, element by element
    assert first["per_layer"] == pytest.approx([4.0, 5.0])
    assert first["eval_loss"] == pytest.approx(1.25)
    assert second["per_layer"] == pytest.approx([4.0, 5.0])
    assert second["eval_loss"] == pytest.approx(1.0) and "odd" not in second


class SimGrid(FakeGrid):
    """Answers each instruction as a pruned client would: held rows of the global + 1."""

    HELD = {1: [0, 1], 2: [1, 2], 3: None}

    def send_and_receive(self, messages, *, timeout=None):
        return [self._answer(message) for message in messages]

    def _answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        metrics = {"num-examples": 2, "client-id": 10 + node}
        if message.metadata.message_type == MessageType.EVALUATE:
            metrics |= {"eval_loss": 1.0, "eval_ppl": float(node)}
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
        arrays = numpy_of(message.content["arrays"])
        rows = self.HELD[node] if self.HELD[node] is not None else slice(None)
        update = {ROUTER: arrays[ROUTER][rows] + 1, SHARED: arrays[SHARED] + 1}
        experts = {"1": self.HELD[node]} if self.HELD[node] is not None else None
        return reply(message, update, metrics, experts)


def test_two_rounds_through_flower_start():
    # Prepare
    strategy = FedMoE(expert_rows=EXPERT_ROWS)

    # Execute
    result = strategy.start(SimGrid([1, 2, 3]), global_arrays(), num_rounds=2)

    # Assert: every row has a holder each round, so every value grows by 1 per round
    final = numpy_of(result.arrays)
    np.testing.assert_allclose(final[ROUTER], f32(GLOBAL_ROUTER) + 2)
    np.testing.assert_allclose(final[SHARED], [2, 2, 2])
    assert sorted(strategy.history) == [1, 2]
    assert sorted(strategy.history[2].accepted) == [11, 12, 13]
    assert result.evaluate_metrics_clientapp[2]["eval_ppl"] == pytest.approx(2.0)
    assert strategy.history[2].bytes_down == 44 * 3 * 2


def test_bf16_model_sends_and_receives_two_byte_payloads():
    # Prepare: a bf16 model's strategy (values exactly representable in bf16)
    from fedmoe.fl.codec import RAW_STYPE, encode_record, to_numpy

    wire = {ROUTER: "bfloat16", SHARED: "bfloat16"}
    strategy = FedMoE(expert_rows=EXPERT_ROWS, wire_dtypes=wire)
    sent = start_round(strategy, nodes=(1, 2))
    replies = []
    for node, (router, shared, n, cid) in {1: (A_ROUTER, A_SHARED, 1, 10),
                                           2: (B_ROUTER, B_SHARED, 3, 11)}.items():
        content = RecordDict({
            "arrays": encode_record({ROUTER: f32(router), SHARED: f32(shared)}, wire),
            "metrics": MetricRecord({"num-examples": n, "client-id": cid}),
        })
        replies.append(Message(content, reply_to=sent[node]))
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    resent = start_round(strategy, nodes=(1, 2), server_round=2)[1]
    # Assert: instructions carry bf16 (2 bytes a value), the aggregate is exact in float32
    instruction = resent.content.array_records["arrays"]
    assert {a.stype for a in instruction.values()} == {RAW_STYPE}
    assert len(instruction[ROUTER].data) == np.asarray(GLOBAL_ROUTER).size * 2
    first = sent[1].content.array_records["arrays"]
    np.testing.assert_array_equal(to_numpy(first[ROUTER]), f32(GLOBAL_ROUTER))
    np.testing.assert_allclose(numpy_of(arrays)[ROUTER], AB_ROUTER)
    log = strategy.history[1]
    assert log.bytes_up == 2 * 2 * (np.asarray(A_ROUTER).size + len(A_SHARED))
    assert log.bytes_down == 2 * 2 * (np.asarray(GLOBAL_ROUTER).size + 3)
