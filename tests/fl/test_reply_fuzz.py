"""No reply can crash the server: arbitrary reply RecordDicts against the real strategy.

Hypothesis builds replies out of what a client (or anyone holding a node's key) can put on
the wire: random record names and keys, arrays of any dtype and shape, NaN/inf/huge values,
empty and non-array payloads (raw bytes, ``.npz`` archives, unknown serialization types),
metrics and configs holding inf/nan/huge ints/strings/lists, and error replies. Each example
runs one round of ``aggregate_train`` and ``aggregate_evaluate`` of FedMoE (mean, median,
trimmed mean, FedAdam on top): neither may raise, and the global tensors stay finite.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmoe.fl.strategy import FedMoE, FedMoEAdam
from tests.helpers.records import serverapp_identity

ROUTER = "model.layers.1.mlp.gate.weight"
SHARED = "model.layers.1.mlp.shared_expert.down_proj.weight"
GLOBAL = {ROUTER: np.arange(8, dtype=np.float32).reshape(4, 2), SHARED: np.zeros(3, np.float32)}
NODES = (1, 2, 3, 4)


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    with serverapp_identity():
        yield


class Grid:
    def get_node_ids(self):
        return list(NODES)


# --- what a reply can hold -------------------------------------------------------------------

EXTREMES = [0.0, -0.0, 1.0, 3e38, -3e38, 1e308, -1e308, float("nan"), float("inf"),
            float("-inf"), 5e-324]
floats = st.one_of(st.sampled_from(EXTREMES), st.floats(allow_nan=True, allow_infinity=True))
ints = st.one_of(st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63)]),
                 st.integers(-(2**63), 2**63 - 1))
keys = st.one_of(st.sampled_from([ROUTER, SHARED, "num-examples", "client-id", "train_loss",
                                  "eval_ppl", "1", "0", "", "x" * 200]),
                 st.text(max_size=12))
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


@st.composite
def ndarrays(draw) -> np.ndarray:
    """Arrays of any dtype; float ones often at the global shapes, with extreme values."""
    kind = draw(st.sampled_from(["global", "global", "any"]))
    if kind == "global":
        shape = GLOBAL[draw(st.sampled_from([ROUTER, SHARED]))].shape
        dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.float16]))
        with np.errstate(over="ignore"):
            return draw(hnp.arrays(dtype, shape, elements=floats.map(
                lambda x: np.asarray(x).astype(dtype)), fill=st.nothing()))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int32, np.int8, np.bool_,
                                  np.complex64, np.uint64]))
    return draw(hnp.arrays(dtype, draw(shapes)))


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.ones(3, np.float32))
    return buffer.getvalue()


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value)
    return buffer.getvalue()


@st.composite
def arrays(draw) -> Array:
    """An Array: a real one, or raw bytes that do not decode to a single ndarray."""
    kind = draw(st.sampled_from(["ndarray", "ndarray", "empty", "npz", "junk", "truncated",
                                 "stype", "unicode"]))
    shape = draw(st.sampled_from([(4, 2), (3,), (0,)]))
    if kind == "ndarray":
        return Array(np.ascontiguousarray(draw(ndarrays())))
    if kind == "unicode":
        return Array(np.array(["nan", "1e38"]))
    data = {"empty": b"", "npz": _npz(), "junk": draw(st.binary(max_size=64)),
            "truncated": _npy(np.ones(shape, np.float32))[:-3],
            "stype": _npy(np.ones(shape, np.float32))}[kind]
    stype = "torch.Tensor" if kind == "stype" else "numpy.ndarray"
    return Array(dtype="float32", shape=shape, stype=stype, data=data)


metric_values = st.one_of(floats, ints, st.lists(floats, max_size=3),
                          st.lists(ints, max_size=3))
config_values = st.one_of(metric_values, st.text(max_size=8), st.binary(max_size=8),
                          st.booleans(), st.lists(st.text(max_size=3), max_size=3),
                          st.lists(st.integers(-3, 9), max_size=5))


@st.composite
def metric_records(draw) -> MetricRecord:
    """Often a plausible record with one field gone wrong, else random keys and values."""
    if draw(st.booleans()):
        record = {"num-examples": draw(st.one_of(st.integers(1, 10**12), metric_values)),
                  "client-id": draw(st.one_of(st.integers(0, 5), metric_values)),
                  "train_loss": draw(floats), "eval_ppl": draw(floats)}
        record = {k: v for k, v in record.items() if draw(st.integers(0, 9))}  # drop some
    else:
        record = draw(st.dictionaries(keys, metric_values, max_size=4))
    return MetricRecord(record)


@st.composite
def replies(draw) -> RecordDict | Error:
    """The content of one reply (or an error reply)."""
    if draw(st.integers(0, 9)) == 0:
        return Error(code=draw(st.integers(0, 10)), reason=draw(st.text(max_size=20)))
    content = RecordDict()
    if draw(st.integers(0, 4)):  # usually the expected record names
        content["arrays"] = ArrayRecord(draw(st.dictionaries(
            st.one_of(st.sampled_from([ROUTER, SHARED]), keys), arrays(), max_size=3)))
        content["metrics"] = draw(metric_records())
        if draw(st.booleans()):
            content["experts"] = ConfigRecord(draw(st.dictionaries(
                st.one_of(st.sampled_from(["1", "0", "-1", "x"]), keys), config_values,
                max_size=2)))
    for _ in range(draw(st.integers(0, 2))):  # extra or misnamed records of every kind
        name = draw(keys)
        record = draw(st.sampled_from(["array", "metric", "config"]))
        if record == "array":
            content[name] = ArrayRecord(draw(st.dictionaries(keys, arrays(), max_size=2)))
        elif record == "metric":
            content[name] = draw(metric_records())
        else:
            content[name] = ConfigRecord(draw(st.dictionaries(keys, config_values, max_size=2)))
    return content


def good(client: int, scale: float = 1.0) -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord({k: Array((v + scale).astype(np.float32))
                               for k, v in GLOBAL.items()}),
        "metrics": MetricRecord({"num-examples": 4, "client-id": client, "train_loss": 1.0,
                                 "eval_ppl": 3.0}),
    })


def build(kind: str) -> FedMoE:
    if kind == "adam":
        return FedMoEAdam(expert_rows={ROUTER: 1}, eta=0.1)
    return FedMoE(expert_rows={ROUTER: 1}, rule=kind)


def answer(instruction: Message, content: RecordDict | Error) -> Message:
    return Message(content, reply_to=instruction)


# --- the property ----------------------------------------------------------------------------

@settings(max_examples=2000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kind=st.sampled_from(["mean", "median", "trimmed_mean", "adam"]),
       fuzzed=st.lists(replies(), min_size=1, max_size=3),
       honest=st.integers(0, 2), data=st.data())
def test_no_reply_crashes_the_server_and_the_global_stays_finite(kind, fuzzed, honest, data):
    # Prepare: some honest replies and the fuzzed ones, each from one of the sampled nodes
    strategy = build(kind)
    record = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    sent = list(strategy.configure_train(1, record, ConfigRecord(), Grid()))
    contents = [good(10 + i, scale=0.1 * (i + 1)) for i in range(honest)] + fuzzed
    messages = [answer(sent[data.draw(st.integers(0, len(sent) - 1))], c) for c in contents]

    # Execute: neither aggregation may raise
    arrays, _ = strategy.aggregate_train(1, messages)
    eval_sent = list(strategy.configure_evaluate(1, record, ConfigRecord(), Grid()))
    strategy.aggregate_evaluate(1, [answer(eval_sent[i % len(eval_sent)], c)
                                    for i, c in enumerate(contents)])

    # Assert: a new global, if any, is finite, bounded and at the global shapes and dtypes
    log = strategy.history[1]
    event(f"fuzzed replies accepted: {len(set(log.accepted) - {10, 11})}")
    if arrays is not None:
        for key, value in arrays.items():
            out = value.numpy()
            assert out.shape == GLOBAL[key].shape and out.dtype == np.float32
            assert np.isfinite(out).all() and np.abs(out).max() <= strategy.max_abs_value
    assert len(log.accepted) + len(log.rejected) <= len(messages)
