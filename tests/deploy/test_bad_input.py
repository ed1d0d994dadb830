"""Bad input gets a clear error or a logged rejection, and nothing is lost.

Replies: the malformations tests/fl/test_strategy.py does not cover (a misnamed tensor,
half-precision and integer tensors, extra records, bad example counts, undecodable bytes,
non-finite evaluate metrics). Personal state: a truncated or corrupt file falls back to the
last good state, naming the file. Configs: rejected before anything is built, naming the key.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from safetensors.torch import save_file

from fedmoe.artifacts import ClientMeta
from fedmoe.client.state import PREV_TENSORS, STATE_ID, PersonalStateError, PersonalStore
from fedmoe.config import validate
from fedmoe.fl.bridge import compose, to_run_config
from fedmoe.fl.strategy import FedMoE
from tests.helpers.records import ROUTER

pytestmark = pytest.mark.usefixtures("serverapp_identity")

SHARED = "model.layers.1.mlp.shared_expert.down_proj.weight"
GOOD = {ROUTER: np.full((4, 2), 1.0, np.float32), SHARED: np.full(3, 1.0, np.float32)}


class Grid:
    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


def sent_messages(strategy: FedMoE, nodes=(1, 2, 3), evaluate: bool = False) -> dict:
    arrays = ArrayRecord({k: Array(np.zeros_like(v)) for k, v in GOOD.items()})
    configure = strategy.configure_evaluate if evaluate else strategy.configure_train
    return {m.metadata.dst_node_id: m
            for m in configure(1, arrays, ConfigRecord(), Grid(list(nodes)))}


def reply_to(instruction: Message, records: dict) -> Message:
    return Message(RecordDict(records), reply_to=instruction)


def good_records(client: int, examples: int = 2) -> dict:
    return {"arrays": ArrayRecord({k: Array(v) for k, v in GOOD.items()}),
            "metrics": MetricRecord({"num-examples": examples, "client-id": client})}


def bad_records(kind: str) -> dict:
    records = good_records(12)
    arrays = dict(GOOD)
    if kind == "misnamed tensor":
        arrays["model.layers.1.mlp.router.weight"] = arrays.pop(ROUTER)
    elif kind == "float16 tensor":
        arrays[ROUTER] = arrays[ROUTER].astype(np.float16)
    elif kind == "integer tensor":
        arrays[SHARED] = np.ones(3, np.int32)
    elif kind == "extra ArrayRecord":
        records["more"] = ArrayRecord({"x": Array(np.ones(1, np.float32))})
    elif kind == "extra MetricRecord":
        records["more"] = MetricRecord({"num-examples": 1})
    elif kind in ("zero examples", "negative examples", "NaN examples", "list examples"):
        value = {"zero examples": 0, "negative examples": -5, "NaN examples": float("nan"),
                 "list examples": [1, 2]}[kind]
        records["metrics"] = MetricRecord({"num-examples": value, "client-id": 12})
    if kind == "undecodable bytes":
        records["arrays"] = ArrayRecord({
            ROUTER: Array(dtype="float32", shape=(4, 2), stype="numpy.ndarray", data=b"junk"),
            SHARED: Array(GOOD[SHARED])})
    elif "ArrayRecord" not in kind:
        records["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return records


@pytest.mark.parametrize(("kind", "reason"), [
    ("misnamed tensor", f"missing ['{ROUTER}'], unknown ['model.layers.1.mlp.router.weight']"),
    ("float16 tensor", "dtype float16"),
    ("integer tensor", "dtype int32"),
    ("extra ArrayRecord", "expected 1 ArrayRecord, got 2"),
    ("extra MetricRecord", "expected 1 MetricRecord, got 2"),
    ("zero examples", "must be finite and > 0"),
    ("negative examples", "must be finite and > 0"),
    ("NaN examples", "must be finite and > 0"),
    ("list examples", "not a number"),
    ("undecodable bytes", f"array '{ROUTER}' could not be decoded"),
])
def test_malformed_reply_is_rejected_by_name_and_the_round_goes_on(kind, reason, caplog):
    # Prepare: clients 10 and 11 reply well, client 12 (node 3) does not
    strategy = FedMoE(expert_rows={ROUTER: 1})
    sent = sent_messages(strategy)
    replies = [reply_to(sent[1], good_records(10)), reply_to(sent[2], good_records(11)),
               reply_to(sent[3], bad_records(kind))]
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmoe.fl.strategy"):
        arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: rejected with a reason naming what is wrong; the others aggregated
    log = strategy.history[1]
    assert log.accepted == [10, 11]
    assert list(log.rejected) == [12] and reason in log.rejected[12], log.rejected
    assert "client 12 (node 3)" in caplog.text
    np.testing.assert_array_equal(arrays[ROUTER].numpy(), GOOD[ROUTER])


def test_non_finite_evaluate_metric_is_skipped_and_logged(caplog):
    # Prepare
    strategy = FedMoE(expert_rows={ROUTER: 1})
    sent = sent_messages(strategy, evaluate=True)
    metrics = [{"num-examples": 2, "client-id": 10, "eval_ppl": 5.0},
               {"num-examples": 2, "client-id": 11, "eval_ppl": float("inf")}]
    replies = [reply_to(sent[node], {"metrics": MetricRecord(m)})
               for node, m in zip((1, 2), metrics, strict=True)]
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmoe.fl.strategy"):
        aggregated = strategy.aggregate_evaluate(1, replies)
    # Assert
    assert aggregated["eval_ppl"] == 5.0
    assert "eval_ppl" in strategy.history[1].eval_rejected[11]
    assert "client 11" in caplog.text


# --- personal state on a device's disk ----------------------------------------------------


def saved_twice(tmp_path) -> PersonalStore:
    """A store holding round 1 (as the previous state) and round 2 (current)."""
    store = PersonalStore(tmp_path)
    store.save({"experts": torch.ones(4)}, ClientMeta(rounds=1, last_round=1))
    store.save({"experts": torch.full((4,), 2.0)}, ClientMeta(rounds=2, last_round=2))
    return store


@pytest.mark.parametrize("damage", ["truncated tensors", "garbage tensors", "garbage meta"])
def test_corrupt_state_falls_back_to_the_last_good_one_naming_the_file(tmp_path, damage,
                                                                      caplog):
    # Prepare
    store = saved_twice(tmp_path)
    if damage == "truncated tensors":
        store.tensors_path.write_bytes(store.tensors_path.read_bytes()[:-7])
    elif damage == "garbage tensors":
        store.tensors_path.write_bytes(b"\x00" * 64)
    else:
        store.meta_path.write_text('{"rounds": 2, "last_ro')
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmoe.client.state"):
        tensors, meta = store.load()
    # Assert: round 1's state, a warning naming the bad file and the one used instead
    assert meta == ClientMeta(rounds=1, last_round=1)
    assert torch.equal(tensors["experts"], torch.ones(4))
    bad = store.meta_path if damage == "garbage meta" else store.tensors_path
    assert str(bad) in caplog.text and PREV_TENSORS in caplog.text


def test_a_pair_torn_by_a_crash_is_detected(tmp_path):
    # Prepare: a crash between the two renames of a save: round 3's tensors, round 2's meta
    store = saved_twice(tmp_path)
    save_file({"experts": torch.full((4,), 3.0)}, store.tensors_path,
              metadata={STATE_ID: "round-3"})
    # Execute
    tensors, meta = store.load()
    # Assert: never round 3's experts with round 2's metadata
    assert meta.rounds == 1 and torch.equal(tensors["experts"], torch.ones(4))


def test_saving_over_a_corrupt_state_keeps_the_good_previous_one(tmp_path):
    # Prepare
    store = saved_twice(tmp_path)
    store.tensors_path.write_bytes(b"broken")
    # Execute: the client trained again from round 1's state and saves round 2 anew
    store.save({"experts": torch.full((4,), 5.0)}, ClientMeta(rounds=2, last_round=3))
    store.tensors_path.write_bytes(b"broken again")
    tensors, meta = store.load()
    # Assert: the corrupt file never became the "previous" state
    assert meta.last_round == 1 and torch.equal(tensors["experts"], torch.ones(4))


def test_no_readable_state_at_all_names_both_files(tmp_path):
    # Prepare
    store = saved_twice(tmp_path)
    store.tensors_path.write_bytes(b"broken")
    (tmp_path / PREV_TENSORS).write_bytes(b"broken too")
    # Execute / Assert
    with pytest.raises(PersonalStateError) as error:
        store.load()
    assert str(store.tensors_path) in str(error.value)
    assert str(tmp_path / PREV_TENSORS) in str(error.value)


def test_meta_written_before_state_ids_still_loads(tmp_path):
    # A state saved by an older fedmoe: no ids in either file
    store = PersonalStore(tmp_path)
    save_file({"experts": torch.ones(2)}, store.tensors_path)
    store.meta_path.write_text(json.dumps({"rounds": 4}))
    assert store.load()[1] == ClientMeta(rounds=4)


# --- configs ------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.config.num_experts_per_tok=17"],
     "model.config.num_experts_per_tok=17: must be between 1 and model.config.num_experts=16"),
    (["model.config.num_experts_per_tok=0"], "model.config.num_experts_per_tok=0"),
    (["fl.aggregate=[router,experts]"], "fl.aggregate[1]: Invalid value 'experts'"),
    (["model.family=gpt2"], "model.family: Invalid value 'gpt2'"),
    (["+edge.policy=mru"], "edge.policy: Invalid value 'mru'"),
    (["prune.keep=0.5", "prune.score=magnitude"], "prune.score: Invalid value 'magnitude'"),
    (["strategy.rule=mode"], "strategy.rule: Invalid value 'mode'"),
    (["strategy.server_opt=sgd"], "strategy.server_opt: Invalid value 'sgd'"),
    (["strategy.dp.enabled=true", "strategy.dp.clipping_norm=0"],
     "strategy.dp.clipping_norm=0: must be > 0"),
    (["strategy.dp.enabled=true", "prune.keep=0.5"], "strategy.dp.enabled=true needs"),
    (["fl.round_timeout=0"], "fl.round_timeout=0: must be > 0"),
    (["fl.min_replies=0"], "fl.min_replies=0: must be an integer >= 1"),
    (["fl.fraction_train=1.5"], "fl.fraction_train=1.5"),
    (["fl.resume=maybe"], "fl.resume: Value 'maybe' is not a valid bool"),
    (["train.method=qlora"], "train.method: Invalid value 'qlora'"),
    (["train.quantize=nf4"], "train.quantize=nf4: a quantized base cannot be trained in full; "
                             "use train=lora (train.method=full)"),
    (["train=lora", "train.quantize=int4"], "train.quantize: Invalid value 'int4'"),
])
def test_invalid_config_is_rejected_naming_the_key(overrides, message):
    with pytest.raises(ValueError) as error:
        validate(compose(["experiment=smoke", *overrides]), deployment=True)
    assert message in str(error.value)


def test_every_experiment_passes_the_checks():
    for experiment in ("smoke", "demo"):
        validate(compose([f"experiment={experiment}"]), deployment=True)
    # a deployment: more devices than partitions, no federated evaluation
    validate(compose(["experiment=smoke", "fl.min_available_nodes=10",
                      "fl.fraction_evaluate=0"]), deployment=True)


def test_server_app_rejects_a_bad_config_before_building_anything(monkeypatch):
    # Prepare: a run whose config names an unknown role; nothing may be built or sent
    from fedmoe.fl import server_app

    def must_not_run(*args, **kwargs):
        raise AssertionError("the ServerApp built the model of an invalid config")

    monkeypatch.setattr(server_app, "initial_arrays", must_not_run)
    monkeypatch.setattr(server_app, "_runtime_config", must_not_run)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=to_run_config(["experiment=smoke", "fl.aggregate=[gate]"]))
    # Execute / Assert
    with pytest.raises(ValueError, match=r"fl.aggregate\[0\]: Invalid value 'gate'"):
        server_app.main(None, context)


@pytest.mark.parametrize(("overrides", "message"), [
    (["fl.num_rounds=two"], "fl.num_rounds"),  # a type only the schema knows
    (["+fl.rounds=3"], "fl.rounds: unknown key"),  # a misspelt key
    (["train.lr=-1"], "train.lr=-1"),  # a range only the schema knows
])
def test_deployment_checks_include_the_simulation_schemas(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(compose(["experiment=smoke", *overrides]), deployment=True)
