"""One attacker against three honest clients: the global model stays near the honest mean.

The honest clients are real: fedmoe's ClientApp trains the smoke model on their partitions.
The attacker answers the same round with a crafted reply (node 4, client id 3): a claimed
``num-examples`` of 1e12, values of 3e38, and sign-flipped, scaled updates. The server is the
FedMoE strategy with its default safeguards; its new global tensors then go back to the
honest clients for a second round.

The stated bound. With weights capped so that no client holds more than half of the total,
and updates whose norm exceeds ``f = max_update_norm`` times the round's lower median norm
``r`` rejected, the attacker's share ``s <= 1/2`` and its update ``A`` has ``|A| <= f r``, so
the global ``G = H + s (A - H)`` (``H``: the honest mean, all updates relative to the old
global) satisfies ``|G - H| <= (f r + |H|) / 2``. An update beyond the norm bound is rejected
and ``G = H``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedmoe.client.state import PersonalStore
from fedmoe.fl import client_app
from fedmoe.fl.aggregate import cap_weights, reference_norm
from fedmoe.fl.bridge import compose, to_run_config
from fedmoe.fl.server_app import initial_arrays
from fedmoe.fl.strategy import MAX_UPDATE_NORM, FedMoE
from tests.helpers.records import serverapp_identity

pytestmark = pytest.mark.slow

HONEST_NODES, ATTACKER_NODE = (1, 2, 3), 4
RUN = ["experiment=smoke", "train.local_steps=2", "fl.export=false"]


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    with serverapp_identity():
        yield


class Grid:
    def get_node_ids(self):
        return [*HONEST_NODES, ATTACKER_NODE]


def honest_context(node: int, state: Path, base_model: Path) -> Context:
    return Context(run_id=1, node_id=node, state=RecordDict(), run_config=to_run_config(RUN),
                   node_config={"partition-id": node - 1, "state-dir": str(state),
                                "base-model": str(base_model)})


def numpy_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in record.items()}


def delta_norm(arrays: dict, reference: dict) -> float:
    return math.sqrt(sum(float(np.sum((arrays[k] - reference[k]) ** 2)) for k in reference))


@pytest.fixture(scope="module")
def federation(base_model, fedmoe_cache, tmp_path_factory):
    """The server's round-1 instructions and the three honest clients' real replies."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDMOE_CACHE", str(fedmoe_cache))
    state = tmp_path_factory.mktemp("honest")
    arrays, rows, _, _ = initial_arrays(compose([*RUN, f"fl.base_model={base_model}"]))
    sent = {m.metadata.dst_node_id: m for m in
            FedMoE(expert_rows=rows).configure_train(1, arrays, ConfigRecord(), Grid())}
    honest = [client_app.app(sent[n], honest_context(n, state, base_model))
              for n in HONEST_NODES]
    assert not any(r.has_error() for r in honest), [r.error for r in honest if r.has_error()]
    yield arrays, rows, honest, state
    mp.undo()


def attack(instruction: Message, honest: Message, current: dict, kind: str) -> Message:
    """The attacker's reply, made from an honest update ``u``: its arrays and weight."""
    update = {k: v - current[k] for k, v in numpy_of(honest.content["arrays"]).items()}
    values = {
        "num-examples 1e12": lambda k: current[k] + update[k],
        "values 3e38": lambda k: np.full_like(current[k], 3e38),
        "sign-flipped x1000": lambda k: current[k] - 1000 * update[k],
        "sign-flipped x8, num-examples 1e12": lambda k: current[k] - 8 * update[k],
    }[kind]
    examples = 1e12 if "1e12" in kind or "3e38" in kind else 16
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(values(k).astype(np.float32)) for k in current}),
        "metrics": MetricRecord({"num-examples": examples, "client-id": 3, "train_loss": 0.1}),
    })
    return Message(content, reply_to=instruction)


@pytest.mark.parametrize("kind", ["num-examples 1e12", "values 3e38", "sign-flipped x1000",
                                  "sign-flipped x8, num-examples 1e12"])
def test_one_attacker_cannot_move_the_global_far_from_the_honest_mean(federation, base_model,
                                                                      kind):
    # Prepare: the server's round, the honest replies and the attacker's
    arrays, rows, honest, state = federation
    strategy = FedMoE(expert_rows=rows)
    sent = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(1, arrays, ConfigRecord(), Grid())}
    current = numpy_of(arrays)
    replies = [*honest, attack(sent[ATTACKER_NODE], honest[0], current, kind)]

    # Execute
    new, _ = strategy.aggregate_train(1, replies)

    # Assert: within the stated bound of the honest mean (equal to it when rejected)
    updates = [numpy_of(r.content["arrays"]) for r in replies]
    # The honest clients' mean as the server weighs them (by their examples)
    weights = [float(r.content["metrics"]["num-examples"]) for r in replies[:3]]
    honest_mean = {k: np.average([u[k] for u in updates[:3]], axis=0, weights=weights)
                   for k in current}
    norms = [delta_norm(u, current) for u in updates]
    distance = delta_norm(numpy_of(new), honest_mean)
    bound = (MAX_UPDATE_NORM * reference_norm(norms) + delta_norm(honest_mean, current)) / 2
    log = strategy.history[1]
    assert log.accepted[:3] == [0, 1, 2]
    assert distance <= bound, (kind, distance, bound)
    if kind in ("values 3e38", "sign-flipped x1000"):
        assert "update norm" in log.rejected[3]
        assert distance <= 1e-5 * delta_norm(honest_mean, current)
    else:  # accepted, with at most half of the weight: G - H = s (A - H), 0 < s <= 1/2
        assert 3 in log.accepted
        share = _share(numpy_of(new), honest_mean, updates[3])
        # its share is what cap_weights allows it: the larger of 1/2 and 3x the median weight
        capped = cap_weights([*weights, float(replies[3].content["metrics"]["num-examples"])])
        assert 0 < share <= max(0.5, capped[3] / capped.sum()) + 1e-4, share
        assert share == pytest.approx(capped[3] / capped.sum(), abs=1e-3)

    # Execute: the honest clients train round 2 from the new global
    round2 = strategy.configure_train(2, new, ConfigRecord(), Grid())
    out = [client_app.app(m, honest_context(m.metadata.dst_node_id, state, base_model))
           for m in round2 if m.metadata.dst_node_id in HONEST_NODES]

    # Assert: they accept it, and every personal state stays finite
    assert not any(r.has_error() for r in out), [r.error for r in out if r.has_error()]
    for node in HONEST_NODES:
        tensors, meta = PersonalStore(state / f"client_{node - 1:04d}").load()
        assert meta.last_round == 2
        assert all(torch.isfinite(v).all() for v in tensors.values())


def _share(new: dict, honest_mean: dict, attacker: dict) -> float:
    """``s`` with ``new - honest_mean = s (attacker - honest_mean)`` (least squares)."""
    num = sum(float(np.sum((new[k] - honest_mean[k]) * (attacker[k] - honest_mean[k])))
              for k in new)
    return num / delta_norm(attacker, honest_mean) ** 2


def test_without_the_weight_cap_a_huge_claim_owns_the_model(federation):
    """What the cap prevents: with it off, 1e12 claimed examples make the global the
    attacker's (a sign-flipped update within the norm bound)."""
    arrays, rows, honest, _ = federation
    strategy = FedMoE(expert_rows=rows, max_weight_share=None, max_weight_median=None)
    sent = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(1, arrays, ConfigRecord(), Grid())}
    current = numpy_of(arrays)
    attacker = attack(sent[ATTACKER_NODE], honest[0], current,
                      "sign-flipped x8, num-examples 1e12")
    new, _ = strategy.aggregate_train(1, [*honest, attacker])
    np.testing.assert_allclose(numpy_of(new)[next(iter(current))],
                               numpy_of(attacker.content["arrays"])[next(iter(current))],
                               rtol=1e-5, atol=1e-6)
