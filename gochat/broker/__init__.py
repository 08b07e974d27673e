"""The broker: what every node of one chat service must agree on.

The hub of each node keeps only what is local (its sessions and their connections) and asks
the broker for everything shared: nick ownership, room seqs and history, membership, and
the fan-out of room events and DMs to every node. ``MemoryBroker`` is the single-node
default; a networked broker (Redis) implements the same methods, so neither the hub's
callers nor conn.py change with it.
"""
from __future__ import annotations

import abc
from typing import Any, NamedTuple, Protocol

from gochat.config import Config
from gochat.protocol import Outgoing


class BrokerUnavailable(Exception):
    """The shared engine cannot be reached: the request gets ``error unavailable``, nothing is acked."""


class TooManyRooms(Exception):
    """A join would create a room past ``max_rooms`` and no room can be forgotten: ``error too_many_rooms``."""


class RoomPosition(NamedTuple):
    """Where a room's sequence stands (PROTOCOL.md section 3)."""

    seq: int  # the latest seq (0: nothing posted in this epoch)
    first_seq: int  # the oldest retained seq, or seq + 1 when none is retained
    epoch: str  # names this sequence: a room whose sequence restarts gets a new one


NO_EPOCH = "0"  # the epoch of a room that does not exist: it has no sequence yet


class AlreadyAcked(Exception):
    """The session's msg id was acked before (a retry after ``unavailable``, or on another node)."""

    def __init__(self, ack: dict) -> None:
        super().__init__(ack)
        self.ack = ack


class Listener(Protocol):
    """What a broker delivers to: the hub of one node."""

    def deliver_room(self, room: str, out: Outgoing, exclude: str | None) -> None: ...

    def deliver_dm(self, nick_key: str, out: Outgoing) -> bool: ...

    def session_moved(self, session_id: str) -> None:
        """Another node resumed this session: close its connection here, keep it everywhere else."""


class SessionRecord(NamedTuple):
    """A session as another node needs it to resume it."""

    nick: str
    rooms: list[str]
    acks: dict[Any, dict]
    node: str | None  # the node holding its live connection, if any


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
    def append(self, room: str, message: dict, session_id: str | None = None) -> Outgoing:
        """Give a msg the room's next seq, retain it, and fan it out to every node.

        Returns only once the message holds its seq in history: the ack promise. With a
        ``session_id`` and an ``id`` in the message, the ack is remembered for that session
        in the same step (a resume on another node must still see it).
        """

    @abc.abstractmethod
    def publish(self, room: str, out: Outgoing, exclude: str | None = None) -> None:
        """Fan an unretained room event (presence) out to every node's members but ``exclude``."""

    @abc.abstractmethod
    def send_dm(self, nick_key: str, out: Outgoing) -> bool:
        """Deliver to the live connection of a nick, wherever it is; False if there is none."""

    @abc.abstractmethod
    def room_seq(self, room: str) -> RoomPosition:
        """Where the room's sequence stands; a room that does not exist is (0, 1, NO_EPOCH).

        Asking never creates the room: who, history and rooms of unknown rooms cost no state.
        """

    def live_seq(self, room: str) -> int:
        """The last seq this node has fanned out to its members (a shared broker may lag behind)."""
        return self.room_seq(room)[0]

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
        """``{"room", "members", "seq", "epoch"}`` for every room with at least one member.

        Its cost grows with the rooms that have members, never with rooms that are gone.
        """

    @abc.abstractmethod
    def room_count(self) -> int:
        """How many rooms have at least one member, without listing them (for /stats)."""

    # Sessions: a single node keeps them in its hub; a shared broker also stores them, so
    # that a client can resume on any node. The defaults are the single-node ones.

    def save_session(self, session_id: str, nick: str, rooms: list[str], live: bool, ttl: float,
                     resumable: bool = True) -> None:
        """Record where a session stands (live here, or awaiting resume for ``ttl`` seconds)."""

    def load_session(self, session_id: str) -> SessionRecord | None:
        """A resumable session held by another node, or None."""
        return None

    def drop_session(self, session_id: str) -> None:
        """The session ended (bye or expiry)."""

    def remember_dm_ack(self, session_id: str, rid: Any, ack: dict) -> None:
        """Keep a DM's ack for a resume elsewhere (msg acks are kept by ``append``)."""

    def session_taken(self, holder: str | None, session_id: str) -> None:
        """Tell the node that held a session (``holder``) that this node resumed it."""

    def forget_member(self, room: str, nick: str) -> None:
        """Stop keeping a membership alive here without changing shared state (the default keeps none)."""

    def forget_session(self, session_id: str, nick_key: str, nick: str, rooms: list[str]) -> None:
        """Another node took the session: stop keeping its claims alive here, change nothing shared."""

    # The DM rate per recipient (PROTOCOL.md section 6): one budget for all senders on all nodes.

    @abc.abstractmethod
    def take_dm_token(self, nick_key: str) -> bool:
        """Take a token from the bucket of DMs to ``nick_key`` (``dm_rate``, ``dm_burst``); False if empty.

        ``nick_key`` matched NICK_RE before the call. A nick nobody holds takes no token and
        leaves no state behind (the DM gets ``no_such_user``): buckets exist only for
        recipients, and only until they are full again.
        """


def create(config: Config) -> Broker:
    """The broker the ``broker`` setting names, with the limits of ``config``."""
    if config.broker == "memory":
        from gochat.broker.memory import MemoryBroker

        return MemoryBroker(config)
    from gochat.broker.redis import RedisBroker

    return RedisBroker(config)
