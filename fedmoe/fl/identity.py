"""Which SuperNode speaks for which client id, as the server sees it.

A reply names its client in its ``client-id`` metric, which the client itself writes. The
node a reply comes from is not the client's to choose: the SuperLink stamps it, and with
SuperNode authentication a node id belongs to one registered key. So the server binds each
client id to the first node that claims it, and a reply from another node claiming the same
id is rejected while the bound node is still connected (a node that left, e.g. one restarted
without authentication and so given a new id, hands its client id on).
"""

from __future__ import annotations

from collections.abc import Iterable


class ClientIds:
    """Client id -> the node it is bound to, and the nodes connected now."""

    def __init__(self) -> None:
        self.node_of: dict[int, int] = {}
        self.connected: set[int] = set()

    def set_connected(self, nodes: Iterable[int]) -> None:
        """The node ids the grid reports connected (at each configure step)."""
        self.connected = set(nodes)

    def claim(self, client: int, node: int) -> str | None:
        """Bind ``client`` to ``node``; why not, when another connected node holds it."""
        bound = self.node_of.get(client)
        if bound is not None and bound != node and bound in self.connected:
            return f"client id {client} is bound to node {bound}, not to node {node}"
        self.node_of[client] = node
        return None
