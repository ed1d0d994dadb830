"""The ServerApp's round rules around a strategy, by composition (as Flower's DP wrappers).

:class:`RoundRules` is a Flower :class:`~flwr.serverapp.strategy.Strategy` that forwards each
round to the strategy it wraps, with three rules of a deployed run:

- rounds count from ``offset + 1``: ``Strategy.start`` always counts from 1, so a run resumed
  after the checkpoint of round ``offset`` would otherwise number its messages, round log and
  client seeds from 1 again;
- a node sampled for training that sent no reply within the round timeout is logged (it is
  dropped from that round only);
- an aggregate built from fewer than ``min_replies`` accepted replies is discarded, so the
  global tensors stay as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

logger = logging.getLogger(__name__)


class RoundRules(Strategy):
    """``strategy``'s rounds, numbered after ``offset``, with a minimum of accepted replies.

    Parameters
    ----------
    strategy : Strategy
        What runs each round (FedMoE, or Flower's DP wrapper around it).
    accepted : Callable[[int], list[int]]
        Server round -> the clients whose train replies the strategy accepted in it
        (``FedMoE.history[r].accepted``).
    min_replies : int
        Fewest accepted train replies whose aggregate becomes the global model.
    round_timeout : float
        Seconds ``start`` waits for replies (``fl.round_timeout``), named in the log.
    offset : int
        Rounds already done (the checkpoint resumed from).
    """

    def __init__(self, strategy: Strategy, accepted: Callable[[int], list[int]], *,
                 min_replies: int = 1, round_timeout: float, offset: int = 0) -> None:
        self.strategy = strategy
        self.accepted = accepted
        self.min_replies = min_replies
        self.round_timeout = round_timeout
        self.offset = offset
        self._sampled: dict[int, set[int]] = {}  # round -> nodes sent a train instruction

    def summary(self) -> None:
        logger.info("round rules: rounds after %d, at least %d accepted replies",
                    self.offset, self.min_replies)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sampled[server_round] = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.offset
        replies = list(replies)
        silent = (self._sampled.pop(server_round, set())
                  - {m.metadata.src_node_id for m in replies})
        if silent:
            logger.warning("round %d: no train reply from node(s) %s within "
                           "fl.round_timeout=%g s (or node unavailable): dropped from this "
                           "round", server_round, sorted(silent), self.round_timeout)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        accepted = self.accepted(server_round)
        if arrays is not None and len(accepted) < self.min_replies:
            logger.warning("round %d: %d accepted replies < fl.min_replies=%d: the global "
                           "tensors stay as they were", server_round, len(accepted),
                           self.min_replies)
            return None, metrics
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config,
                                                grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)
