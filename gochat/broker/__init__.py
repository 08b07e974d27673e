"""The broker: what every node of one chat service must agree on.

The hub of each node keeps only what is local (its sessions and their connections) and asks
the broker for everything shared: nick ownership, room seqs and history, membership, and
the fan-out of room events and DMs to every node. ``MemoryBroker`` is the single-node
default; a networked broker (Redis) implements the same methods, so neither the hub's
callers nor conn.py change with it.
"""
from __future__ import annotations

import abc
from typing import Protocol

from gochat.protocol import Outgoing


class BrokerUnavailable(Exception):
    """The shared engine cannot be reached: the request gets ``error unavailable``, nothing is acked."""


class Listener(Protocol):
    """What a broker delivers to: the hub of one node."""

    def deliver_room(self, room: str, out: Outgoing, exclude: str | None) -> None: ...

    def deliver_dm(self, nick_key: str, out: Outgoing) -> bool: ...


class Broker(abc.ABC):
    """Shared state of the chat service. Nicks are passed case-folded (``nick_key``)."""

    @abc.abstractmethod
    def start(self, listener: Listener) -> None:
        """Begin delivering room events and DMs to ``listener``."""

    def stop(self) -> None:
        """Release connections and greenlets; the default owns none."""

    @property
    def available(self) -> bool:
        return True

    @abc.abstractmethod
    def claim_nick(self, nick_key: str, owner: str) -> bool:
        """Reserve a nick for a session id; False if another session holds it."""

    @abc.abstractmethod
    def release_nick(self, nick_key: str, owner: str) -> None:
        """Free a nick, only if ``owner`` still holds it."""

    @abc.abstractmethod
    def append(self, room: str, message: dict) -> Outgoing:
        """Give a msg the room's next seq, retain it, and fan it out to every node.

        Returns only once the message holds its seq in history: the ack promise.
        """

    @abc.abstractmethod
    def publish(self, room: str, out: Outgoing, exclude: str | None = None) -> None:
        """Fan an unretained room event (presence) out to every node's members but ``exclude``."""

    @abc.abstractmethod
    def send_dm(self, nick_key: str, out: Outgoing) -> bool:
        """Deliver to the live connection of a nick, wherever it is; False if there is none."""

    @abc.abstractmethod
    def room_seq(self, room: str) -> tuple[int, int]:
        """(latest seq, first retained seq); a new room is (0, 1)."""

    @abc.abstractmethod
    def history(self, room: str, since: int, limit: int | None, until: int | None = None) -> list[Outgoing]:
        """Retained msgs with ``since < seq <= until``, oldest first, at most ``limit``."""

    @abc.abstractmethod
    def add_member(self, room: str, nick: str) -> None: ...

    @abc.abstractmethod
    def remove_member(self, room: str, nick: str) -> None: ...

    @abc.abstractmethod
    def members(self, room: str) -> list[str]:
        """Members in join order, with their nicks as they chose them."""

    @abc.abstractmethod
    def rooms(self) -> list[dict]:
        """``{"room", "members", "seq"}`` for every room with at least one member."""


def create(url: str, history_size: int) -> Broker:
    """The broker a ``broker`` setting names."""
    if url == "memory":
        from gochat.broker.memory import MemoryBroker

        return MemoryBroker(history_size)
    raise ValueError(f"no broker for {url!r} yet")
