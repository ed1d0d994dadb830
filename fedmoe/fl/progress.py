"""A Grid whose ``send_and_receive`` shows a progress bar of client replies as they arrive.

``Strategy.start`` sends a round's messages with ``grid.send_and_receive`` and sees the replies
only once all are in; wrapping the Grid it is given (instead of copying ``start()``) lets a
bar count them live: ``round 3 train: 5/8 clients``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from tqdm.auto import tqdm


class ProgressGrid:
    """``grid`` with a per-round bar of replies; every other attribute is ``grid``'s.

    Parameters
    ----------
    grid : Grid
        The Grid the ServerApp was given.
    enabled : bool
        Show the bar; when False, ``send_and_receive`` is ``grid``'s own.
    pull_interval : float
        Seconds between polls for replies (Flower's in-memory Grid polls every 0.1 s).
    """

    def __init__(self, grid: Grid, enabled: bool = True, pull_interval: float = 0.1) -> None:
        self._grid = grid
        self.enabled = enabled
        self.pull_interval = pull_interval

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """Push ``messages``, pull replies until all are in or ``timeout`` seconds passed."""
        messages = list(messages)
        if not self.enabled or not messages:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        desc = _describe(messages[0])
        pending = set(self._grid.push_messages(messages))
        end = time.time() + (timeout or 0.0)
        replies: list[Message] = []
        # disable=None: no bar when stderr is not a terminal (logs, CI): a nested bar
        # there leaves a line of cursor escapes per refresh.
        with tqdm(total=len(pending), desc=desc, unit="client", leave=False,
                  disable=None) as bar:
            while pending and (timeout is None or time.time() < end):
                new = list(self._grid.pull_messages(pending))
                pending -= {m.metadata.reply_to_message_id for m in new}
                replies += new
                bar.update(len(new))
                if pending:
                    time.sleep(self.pull_interval)
        return replies


def _describe(message: Message) -> str:
    """``round <n> <train|evaluate>`` from a message FedAvg configured."""
    try:
        server_round = message.content["config"]["server-round"]
    except (KeyError, TypeError):
        return message.metadata.message_type
    return f"round {server_round} {message.metadata.message_type}"
