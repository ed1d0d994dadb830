"""FedMoE: Flower's FedAvg, aggregating router rows only over the clients holding them.

The server aggregates a subset of the model (by default the router and shared-expert
tensors); routed experts stay on the clients. After pruning, clients hold different
subsets of routed experts, so a tensor indexed by expert (router weight, router bias) is
averaged row by row over the holders of each expert (FedMoE modular aggregation, arXiv
2408.11304). Each reply is checked on its own: a malformed one is rejected and logged,
the rest of the round goes on.

Protocol of a train reply: ``"arrays"`` (exactly the aggregated keys; expert-indexed keys
with one row per held expert, in id order), ``"metrics"`` (``num-examples``, ``client-id``,
``train_loss``, ...) and optionally ``"experts"``, a ConfigRecord ``str(layer) -> list of
original expert ids held``; without it the client holds every expert.

The math lives in :mod:`fedmoe.fl.aggregate`; this module moves records in and out and
keeps a per-round log in :attr:`FedMoE.history`.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedYogi

from fedmoe.config import SERVER_OPTS
from fedmoe.fl.aggregate import (
    RULES,
    Held,
    cap_weights,
    check_aggregate,
    check_held,
    check_update,
    masked_aggregate,
    norm_outliers,
    reference_norm,
    update_norm,
    weighted_mean_metrics,
)
from fedmoe.fl.codec import encode_record, to_numpy, wire_nbytes
from fedmoe.fl.identity import ClientIds

logger = logging.getLogger(__name__)

EXPERTS_RECORD = "experts"
# A train reply's held-out evaluation of the model just trained (fedmoe.fl.client_task).
EVALUATION_RECORD = "evaluation"
CLIENT_ID = "client-id"
STRATEGY_NAMES = ("fedmoe",)
# Defaults of the safeguards against a hostile reply (see FedMoE's parameters).
MAX_UPDATE_NORM = 10.0
MAX_WEIGHT_SHARE = 0.5
MAX_WEIGHT_MEDIAN = 3.0
MAX_ABS_VALUE = 1e4


@dataclass
class RoundLog:
    """What happened in one server round.

    Attributes
    ----------
    bytes_down : int
        Array bytes sent to clients (numpy ``nbytes`` of the payload times the number of
        messages), train and evaluate messages together.
    bytes_down_eval : int
        The part of ``bytes_down`` sent with evaluate messages.
    bytes_up : int
        Array bytes of all train replies, accepted and rejected.
    bytes_up_by_client : dict[int, int]
        Train-reply array bytes per client id.
    accepted : list[int]
        Client ids whose train replies were aggregated.
    rejected : dict[int, str]
        Client id -> reason its train reply was rejected.
    train_metrics : dict
        Aggregated train metrics of the accepted replies.
    eval_metrics : dict
        Aggregated evaluate metrics.
    eval_by_client : dict[int, dict]
        Client id -> its evaluate metrics (``eval_ppl``, ``num-examples``, ...).
    eval_rejected : dict[int, str]
        Client id -> reason its evaluate reply was skipped.
    sampled : int
        Train instructions sent this round.
    aggregate_rejected : str | None
        Why this round's aggregate did not become the global model (non-finite, out of
        bounds), or None.
    wall_s : float
        Seconds from ``configure_train`` to the end of ``aggregate_evaluate``.
    aggregate_s : float
        Seconds ``aggregate_train`` took (checks and aggregation).
    in_train_eval : list[tuple[int, int, dict]]
        ``(client, node, metrics)`` of the held-out evaluation accepted train replies carried
        (see ``FedMoE.evaluate_in_train_before``).
    started_at : float
        ``time.perf_counter()`` when the round started.

    Clients are named by the ``client-id`` metric, or by node id when a reply has none.
    """

    bytes_down: int = 0
    bytes_down_eval: int = 0
    bytes_up: int = 0
    bytes_up_by_client: dict[int, int] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    train_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    eval_by_client: dict[int, dict] = field(default_factory=dict)
    eval_rejected: dict[int, str] = field(default_factory=dict)
    sampled: int = 0
    aggregate_rejected: str | None = None
    wall_s: float = 0.0
    aggregate_s: float = 0.0
    in_train_eval: list[tuple[int, int, dict]] = field(default_factory=list)
    started_at: float = field(default_factory=time.perf_counter)


@dataclass
class _TrainReply:
    """A train reply that passed its own checks."""

    client: int
    node: int
    update: dict[str, np.ndarray]
    held: Held | None
    weight: float
    content: RecordDict  # without the evaluation record
    evaluation: dict | None = None  # the held-out metrics the reply carried


class FedMoE(FedAvg):
    """FedAvg whose expert-indexed tensors are aggregated per row over the holders.

    Parameters
    ----------
    expert_rows : dict[str, int]
        Array key -> decoder-layer index, for keys whose first dim indexes the routed
        experts of that layer (router weight and bias). Other keys are ordinary tensors;
        entries for keys absent from the global arrays are ignored. Required.
    rule : str
        ``"mean"`` (weighted by ``weighted_by_key``), ``"median"`` or
        ``"trimmed_mean"``, applied per row over the clients holding it.
    trim_beta : float
        Fraction cut at each end by ``"trimmed_mean"``, in ``[0, 0.5)``.
    max_update_norm : float | None
        Reject a reply whose update norm (over held rows) exceeds this many times the
        round's lower median update norm (the smaller one of 2); applied with 2 or more
        replies. ``None``: no norm check.
    max_weight_share, max_weight_median : float | None
        Cap each reply's weight so that no client holds more than the larger of
        ``max_weight_share`` of the round's total and ``max_weight_median`` times the median
        weight (:func:`fedmoe.fl.aggregate.cap_weights`). ``None`` turns a part off.
    max_abs_value : float | None
        An aggregate with a non-finite value, or one beyond this magnitude, does not become
        the global model (the round keeps the old one). ``None``: finiteness only.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.

    Attributes
    ----------
    history : dict[int, RoundLog]
        Server round -> what happened in it.
    evaluate_in_train_before : int
        Rounds before this one send no evaluate message: their train instruction asks each
        client to evaluate the model it just trained and send the metrics with its update
        (on Flower's Deployment Engine a message costs a client process). From this round on
        (the last, whose evaluation is of the final model) clients evaluate the new global
        model with their personal state. 0 (default): every round has its evaluate message.
    """

    evaluate_in_train_before: int = 0

    def __init__(self, *, wire_dtypes: dict[str, str] | None = None, **kwargs) -> None:
        # The FedMoE options are set_moe_options's keywords; the rest are FedAvg's.
        options = {name: kwargs.pop(name) for name in moe_option_names() if name in kwargs}
        super().__init__(**kwargs)
        # Key -> dtype the global tensors travel in (the model's: bf16 as 2-byte payloads,
        # fedmoe.fl.codec); the strategy itself keeps and aggregates float32. Composed
        # classes (FedMoEAdam) set it before FedOpt.__init__ reaches here.
        if wire_dtypes is not None or not hasattr(self, "wire_dtypes"):
            self.wire_dtypes = dict(wire_dtypes or {})
        # Composed classes (FedMoEAdam) set the options before FedOpt.__init__ reaches
        # here with FedAvg's arguments only.
        if options:
            self.set_moe_options(**options)
        elif not hasattr(self, "expert_rows"):
            raise TypeError("FedMoE() needs the keyword argument 'expert_rows'")
        self.history: dict[int, RoundLog] = {}
        self._global: dict[str, np.ndarray] | None = None
        self._sent: list[Message] = []  # this round's instructions (ids set when pushed)
        self._client_of_node: dict[int, int] = {}  # learnt from replies' client-id
        self._ids = ClientIds()  # client id -> the node it is bound to

    def set_moe_options(
        self,
        *,
        expert_rows: dict[str, int],
        rule: str = "mean",
        trim_beta: float = 0.2,
        max_update_norm: float | None = MAX_UPDATE_NORM,
        max_weight_share: float | None = MAX_WEIGHT_SHARE,
        max_weight_median: float | None = MAX_WEIGHT_MEDIAN,
        max_abs_value: float | None = MAX_ABS_VALUE,
    ) -> None:
        """Validate and store the FedMoE options (see the class docstring)."""
        if rule not in RULES:
            raise ValueError(f"strategy.rule must be one of {RULES}, got '{rule}'")
        if not 0.0 <= trim_beta < 0.5:
            raise ValueError(f"strategy.trim_beta must lie in [0, 0.5), got {trim_beta}")
        for name, value in (("max_update_norm", max_update_norm),
                            ("max_weight_median", max_weight_median),
                            ("max_abs_value", max_abs_value)):
            if value is not None and not value > 0:
                raise ValueError(f"strategy.{name} must be > 0, got {value}")
        if max_weight_share is not None and not 0 < max_weight_share <= 1:
            raise ValueError(f"strategy.max_weight_share must lie in (0, 1], got "
                             f"{max_weight_share}")
        self.expert_rows = dict(expert_rows)
        self.rule = rule
        self.trim_beta = trim_beta
        self.max_update_norm = max_update_norm
        self.max_weight_share = max_weight_share
        self.max_weight_median = max_weight_median
        self.max_abs_value = max_abs_value

    def summary(self) -> None:
        """Log the FedMoE settings, then FedAvg's."""
        logger.info(
            "FedMoE: rule=%s trim_beta=%s max_update_norm=%s expert keys=%d",
            self.rule,
            self.trim_beta,
            self.max_update_norm,
            len(self.expert_rows),
        )
        super().summary()

    # --- configure ----------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients as FedAvg does; remember the global arrays and bytes sent."""
        if server_round < self.evaluate_in_train_before:
            config = ConfigRecord({**config, "evaluate": True})
        wire = self._wire(arrays)
        messages = list(super().configure_train(server_round, wire, config, grid))
        self._sent = messages
        self._ids.set_connected(grid.get_node_ids())
        self.history[server_round] = RoundLog(sampled=len(messages))
        self._remember(server_round, arrays, wire, len(messages), evaluate=False)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients as FedAvg does; count the bytes sent. None in a round whose train
        replies carried their evaluation."""
        if server_round < self.evaluate_in_train_before:
            return []
        wire = self._wire(arrays)
        messages = list(super().configure_evaluate(server_round, wire, config, grid))
        self._sent = messages
        self._ids.set_connected(grid.get_node_ids())
        self._remember(server_round, arrays, wire, len(messages), evaluate=True)
        return messages

    def _wire(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global arrays in the dtype they travel in (unchanged when all are float32)."""
        if not any(dtype != "float32" for dtype in self.wire_dtypes.values()):
            return arrays
        return encode_record({k: to_numpy(a) for k, a in arrays.items()}, self.wire_dtypes)

    def _remember(
        self, server_round: int, arrays: ArrayRecord, wire: ArrayRecord, num_messages: int,
        evaluate: bool,
    ) -> None:
        self._global = {key: to_numpy(array) for key, array in arrays.items()}
        sent = sum(wire_nbytes(array) for array in wire.values()) * num_messages
        round_log = self.history.setdefault(server_round, RoundLog())
        round_log.bytes_down += sent
        if evaluate:
            round_log.bytes_down_eval += sent

    # --- train --------------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply on its own, then aggregate the accepted ones per row.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The aggregated arrays at full shapes and the weighted train metrics, or
            ``(None, None)`` when no reply was accepted.
        """
        if self._global is None:
            raise RuntimeError("FedMoE.aggregate_train needs configure_train to run first")
        current = self._global
        round_log = self.history.setdefault(server_round, RoundLog())
        started = time.perf_counter()
        accepted = []
        for message in replies:
            reply = self._accept_train_reply(message, current, round_log)
            if reply is not None:
                accepted.append(reply)
        accepted = self._drop_norm_outliers(accepted, current, round_log)
        round_log.accepted = [reply.client for reply in accepted]
        round_log.in_train_eval = [(reply.client, reply.node, reply.evaluation)
                                   for reply in accepted if reply.evaluation is not None]
        round_log.wall_s = time.perf_counter() - round_log.started_at
        logger.info(
            "aggregate_train: round %d accepted %d, rejected %d",
            server_round,
            len(accepted),
            len(round_log.rejected),
        )
        if not accepted:
            return None, None
        arrays = masked_aggregate(
            [r.update for r in accepted],
            [r.held for r in accepted],
            cap_weights([r.weight for r in accepted], self.max_weight_share,
                        self.max_weight_median),
            current,
            self._expert_rows(current),
            self.rule,
            self.trim_beta,
        )
        metrics = self._aggregate_metrics([r.content for r in accepted], train=True)
        round_log.train_metrics = dict(metrics)
        round_log.aggregate_s = time.perf_counter() - started
        if not self._aggregate_ok(arrays, round_log):
            return None, metrics
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}), metrics

    def _aggregate_ok(self, arrays: Mapping[str, np.ndarray], round_log: RoundLog) -> bool:
        """Whether an aggregate may become the global model; logged and recorded if not."""
        reason = check_aggregate(arrays, self.max_abs_value)
        if reason is not None:
            logger.warning("the aggregate stays out of the global model: %s", reason)
            round_log.aggregate_rejected = reason
        return reason is None

    def _accept_train_reply(
        self, message: Message, current: dict[str, np.ndarray], round_log: RoundLog
    ) -> _TrainReply | None:
        """Unpack and check one train reply; log and record a rejection."""
        client, node, reason = self._source(message)
        try:
            reply, unpack_reason, nbytes = self._unpack_train_reply(message, client, node,
                                                                    current)
        except Exception as error:  # no reply may stop the server: any failure rejects it
            reply, unpack_reason, nbytes = None, f"malformed reply ({type(error).__name__})", 0
        reason = reason or unpack_reason
        reply = None if reason else reply
        round_log.bytes_up += nbytes
        round_log.bytes_up_by_client[client] = round_log.bytes_up_by_client.get(client, 0) + nbytes
        if reason is not None:
            self._reject(round_log.rejected, node, client, reason)
        return reply

    def _unpack_train_reply(
        self, message: Message, client: int, node: int, current: dict[str, np.ndarray]
    ) -> tuple[_TrainReply | None, str | None, int]:
        """Return ``(reply, None, bytes)`` or ``(None, reason, bytes)``."""
        if message.has_error():
            return None, f"error reply: {message.error.reason}", 0
        content, evaluation = split_evaluation(message.content)
        if len(content.array_records) != 1:
            return None, f"expected 1 ArrayRecord, got {len(content.array_records)}", 0
        record = next(iter(content.array_records.values()))
        update, reason = decode_arrays(record)
        nbytes = sum(wire_nbytes(array) for key, array in record.items() if key in update)
        if reason is not None:
            return None, reason, nbytes
        expert_rows = self._expert_rows(current)
        held, reason = parse_held(content, expert_rows, current)
        reason = reason or check_update(update, held, current, expert_rows)
        weight, weight_reason = reply_weight(content, self.weighted_by_key)
        reason = reason or weight_reason or nonfinite_metric(content)
        if reason:
            return None, reason, nbytes
        return _TrainReply(client, node, update, held, weight, content, evaluation), None, nbytes

    def _drop_norm_outliers(
        self, replies: list[_TrainReply], current: dict[str, np.ndarray], round_log: RoundLog
    ) -> list[_TrainReply]:
        """Reject replies whose update norm is far above the round's median."""
        if self.max_update_norm is None:
            return replies
        expert_rows = self._expert_rows(current)
        norms = [update_norm(r.update, r.held, current, expert_rows) for r in replies]
        median = reference_norm(norms) if norms else 0.0
        kept = []
        for reply, norm, outlier in zip(
            replies, norms, norm_outliers(norms, self.max_update_norm), strict=True
        ):
            if outlier:
                reason = (
                    f"update norm {norm:.4g} exceeds {self.max_update_norm} x the "
                    f"round's (lower) median update norm {median:.4g}"
                )
                self._reject(round_log.rejected, reply.node, reply.client, reason)
            else:
                kept.append(reply)
        return kept

    def _expert_rows(self, current: Mapping[str, np.ndarray]) -> dict[str, int]:
        return {key: layer for key, layer in self.expert_rows.items() if key in current}

    # --- evaluate -----------------------------------------------------------------------

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of the well-formed evaluate replies (or, in a round without evaluate
        messages, of the evaluations the train replies carried); bad ones are skipped."""
        round_log = self.history.setdefault(server_round, RoundLog())
        evaluations = [(*self._source(message), message) for message in replies]
        if server_round < self.evaluate_in_train_before:
            evaluations = [(client, node, None, metrics)
                           for client, node, metrics in round_log.in_train_eval]
        accepted = []
        for client, node, reason, reply in evaluations:
            try:
                if isinstance(reply, Message):
                    reason = reason or check_metrics_reply(reply, self.weighted_by_key)
                    content = reply.content
                else:
                    content = RecordDict({"metrics": MetricRecord(reply)})
                    reason = check_metrics_content(content, self.weighted_by_key)
            except Exception as error:  # no reply may stop the server
                reason = f"malformed reply ({type(error).__name__})"
            if reason is not None:
                self._reject(round_log.eval_rejected, node, client, reason)
                continue
            accepted.append(content)
            round_log.eval_by_client[client] = dict(only_metric_record(content))
        metrics = self._aggregate_metrics(accepted, train=False) if accepted else None
        round_log.eval_metrics = dict(metrics) if metrics is not None else {}
        round_log.wall_s = time.perf_counter() - round_log.started_at
        return metrics

    # --- shared -------------------------------------------------------------------------

    def _source(self, message: Message) -> tuple[int, int, str | None]:
        """``(client id, node id, reason)`` of a reply; ``reason`` says why it is rejected
        for the id it claims (not a finite integer, or bound to another node), else None.

        The SuperLink answers for a node that died with an error reply from itself
        (``SUPERLINK_NODE_ID``); that reply is traced to the node its instruction went to, and
        the client id to the one that node reported before (else the node id). A reply
        rejected for its claimed id is named by its node id.
        """
        node = message.metadata.src_node_id
        if node == SUPERLINK_NODE_ID and message.has_error():
            sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent
                       if m.metadata.message_id}  # ids are set when the grid pushes
            node = sent_to.get(message.metadata.reply_to_message_id, node)
        client, reason = claimed_client_id(message)
        reason = reason or (None if client is None else self._ids.claim(client, node))
        if reason is not None:
            return node, node, reason
        if client is None:
            return self._client_of_node.get(node, node), node, None
        self._client_of_node[node] = client
        return client, node, None

    def _aggregate_metrics(self, contents: list[RecordDict], train: bool) -> MetricRecord:
        """Flower's metric aggregation when keys agree, a per-key mean otherwise."""
        records = [only_metric_record(content) for content in contents]
        aggregate_fn = self.train_metrics_aggr_fn if train else self.evaluate_metrics_aggr_fn
        if all(set(record) == set(records[0]) for record in records):
            try:
                metrics = aggregate_fn(contents, self.weighted_by_key)
            except Exception as error:  # e.g. list metrics of unequal lengths
                logger.warning("metric aggregation failed (%s); using a per-key mean", error)
            else:
                # An average of client ids means nothing.
                metrics.pop(CLIENT_ID, None)
                return metrics
        else:
            logger.warning(
                "clients report different metric keys; averaging each key "
                "over the clients that report it"
            )
        weights = cap_weights([float(record[self.weighted_by_key]) for record in records])
        try:
            means = weighted_mean_metrics(
                [dict(record) for record in records],
                weights,
                exclude=(self.weighted_by_key, CLIENT_ID),
            )
        except Exception as error:  # metrics are a report: never a reason to stop a round
            logger.warning("metric aggregation failed (%s); no metrics this round", error)
            means = {}
        return MetricRecord(means)

    @staticmethod
    def _reject(rejected: dict[int, str], node: int, client: int, reason: str) -> None:
        logger.warning("rejected reply from client %s (node %s): %s", client, node, reason)
        rejected[client] = reason


# --- reply helpers -------------------------------------------------------------------------


def claimed_client_id(message: Message) -> tuple[int | None, str | None]:
    """``(id, None)`` for the reply's ``client-id`` metric (``None`` when it has none), or
    ``(None, reason)`` when it is not a finite integer."""
    if not message.has_content():
        return None, None
    for record in message.content.metric_records.values():
        value = record.get(CLIENT_ID)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or value != int(value)):
            return None, f"metric '{CLIENT_ID}' must be an integer, got {value!r}"
        return int(value), None
    return None, None


def split_evaluation(content: RecordDict) -> tuple[RecordDict, dict | None]:
    """A train reply without its evaluation record, and that record's metrics (or None)."""
    if EVALUATION_RECORD not in content.metric_records:
        return content, None
    rest = RecordDict({k: v for k, v in content.items() if k != EVALUATION_RECORD})
    return rest, dict(content.metric_records[EVALUATION_RECORD])


def only_metric_record(content: RecordDict) -> MetricRecord:
    """The single MetricRecord of a reply (checked beforehand)."""
    return next(iter(content.metric_records.values()))


def decode_arrays(record: ArrayRecord) -> tuple[dict[str, np.ndarray], str | None]:
    """Decode every array to numpy (bf16/fp16 payloads widened to float32, exactly); return
    the decoded ones and a reason on failure."""
    decoded: dict[str, np.ndarray] = {}
    for key, array in record.items():
        try:
            value = to_numpy(array)
        except Exception as error:  # np.load of hostile bytes raises many kinds
            return decoded, f"array '{key}' could not be decoded: {type(error).__name__}"
        if not isinstance(value, np.ndarray):  # e.g. an .npz archive
            return decoded, f"array '{key}' is not a single numpy array"
        decoded[key] = value
    return decoded, None


def reply_weight(content: RecordDict, weighted_by_key: str) -> tuple[float, str | None]:
    """The reply's positive, finite weight, or a reason it has none."""
    if len(content.metric_records) != 1:
        return 0.0, f"expected 1 MetricRecord, got {len(content.metric_records)}"
    value = only_metric_record(content).get(weighted_by_key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0, f"metric '{weighted_by_key}' is missing or not a number: {value!r}"
    if not math.isfinite(value) or value <= 0:
        return 0.0, f"metric '{weighted_by_key}' must be finite and > 0, got {value}"
    return float(value), None


def check_metrics_reply(message: Message, weighted_by_key: str) -> str | None:
    """Why an evaluate reply cannot be aggregated, or ``None``."""
    if message.has_error():
        return f"error reply: {message.error.reason}"
    return check_metrics_content(message.content, weighted_by_key)


def check_metrics_content(content: RecordDict, weighted_by_key: str) -> str | None:
    """Why an evaluation's metrics cannot be aggregated, or ``None``."""
    _, reason = reply_weight(content, weighted_by_key)
    return reason or nonfinite_metric(content)


def nonfinite_metric(content: RecordDict) -> str | None:
    """Why a reply's metrics cannot be averaged (a value that is not a finite number)."""
    for record in content.metric_records.values():
        for key, value in record.items():
            try:
                finite = bool(np.isfinite(np.asarray(value, dtype=np.float64)).all())
            except (OverflowError, ValueError, TypeError):  # e.g. an int beyond float64
                finite = False
            if not finite:
                return f"metric '{key}' is not finite: {value!r:.40}"
    return None


def parse_held(
    content: RecordDict, expert_rows: Mapping[str, int], current: Mapping[str, np.ndarray]
) -> tuple[Held | None, str | None]:
    """Read the optional ``"experts"`` ConfigRecord into layer -> held expert ids."""
    record = content.config_records.get(EXPERTS_RECORD)
    if record is None:
        return None, None
    held: Held = {}
    for layer, ids in record.items():
        try:
            index = int(layer)
        except ValueError:
            return None, f"bad experts record: key '{layer}' is not a layer index"
        if not isinstance(ids, list):
            return None, f"bad experts record: layer {layer} must map to a list, got {ids!r}"
        held[index] = list(ids)
    num_experts = {layer: current[key].shape[0] for key, layer in expert_rows.items()}
    reason = check_held(held, num_experts)
    return (None, f"bad experts record: {reason}") if reason else (held, None)


# --- server-side optimizers on the aggregated subset ---------------------------------------


def moe_option_names() -> list[str]:
    """The FedMoE options: the keywords of :meth:`FedMoE.set_moe_options`."""
    return list(inspect.signature(FedMoE.set_moe_options).parameters)[1:]


class _ServerOptOnFedMoE:
    """Runs a FedOpt server step (first in the MRO) on FedMoE's masked aggregate."""

    def __init__(self, *, wire_dtypes: dict[str, str] | None = None, **kwargs) -> None:
        # FedOpt.__init__ calls FedMoE.__init__ with FedAvg's arguments only, so the
        # FedMoE options (FedMoE.set_moe_options's keywords) are taken and set first.
        self.wire_dtypes = dict(wire_dtypes or {})
        self.set_moe_options(**{name: kwargs.pop(name) for name in moe_option_names()
                                if name in kwargs})
        super().__init__(**kwargs)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedOpt's step on the masked aggregate, cast back to the global dtypes."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        # FedAdam/FedYogi promote float32 to float64 (numpy scalars in the step).
        dtypes = {key: value.dtype for key, value in self.current_arrays.items()}
        cast = {key: np.asarray(a.numpy(), dtype=dtypes[key]) for key, a in arrays.items()}
        if not self._aggregate_ok(cast, self.history.setdefault(server_round, RoundLog())):
            return None, metrics
        return ArrayRecord({key: Array(value) for key, value in cast.items()}), metrics


class FedMoEAdam(_ServerOptOnFedMoE, FedAdam, FedMoE):
    """FedAdam's server step on top of FedMoE's masked aggregate.

    MRO: FedMoEAdam -> FedAdam -> FedOpt -> FedMoE -> FedAvg (after the small
    ``_ServerOptOnFedMoE`` shim). Rows nobody held have a zero pseudo-gradient, yet
    still move with Adam's momentum from earlier rounds.
    """


class FedMoEYogi(_ServerOptOnFedMoE, FedYogi, FedMoE):
    """FedYogi's server step on top of FedMoE's masked aggregate (MRO as FedMoEAdam)."""


def build_strategy(name: str = "fedmoe", server_opt: str | None = None, **kwargs) -> FedMoE:
    """Build the server strategy.

    Parameters
    ----------
    name : str
        Strategy name (``strategy.name``); only ``"fedmoe"``.
    server_opt : str | None
        Server optimizer (``strategy.server_opt``): ``None`` (or ``"none"``/``""``) for
        the plain masked aggregate, ``"adam"`` or ``"yogi"`` for Flower's FedAdam or
        FedYogi step on top of it.
    **kwargs
        :class:`FedMoE` arguments (``expert_rows`` required), FedAvg arguments and, with
        a server optimizer, its arguments (``eta``, ``eta_l``, ``beta_1``, ``beta_2``,
        ``tau``).

    Returns
    -------
    FedMoE
        The strategy.
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(f"strategy.name must be one of {STRATEGY_NAMES}, got '{name}'")
    if server_opt is None or server_opt.lower() in ("", "none"):
        return FedMoE(**kwargs)
    classes = {"adam": FedMoEAdam, "yogi": FedMoEYogi}
    if server_opt not in classes:
        raise ValueError(
            f"strategy.server_opt must be one of {(None, *SERVER_OPTS)}, got '{server_opt}'"
        )
    return classes[server_opt](**kwargs)
