"""The single-node broker: shared state in this process's memory.

Everything runs synchronously in the calling greenlet with no yield, so ``append`` fans a
message out to every member before the next message can take a seq: order without locks.
"""
from __future__ import annotations

import itertools
import secrets
from collections import deque

from gochat.broker import NO_EPOCH, Broker, Listener, RoomPosition
from gochat.config import Config
from gochat.limits import RecipientRates
from gochat.protocol import Outgoing


class RoomLog:
    """One room's seq counter, retained messages and members (nick key -> nick, in join order)."""

    __slots__ = ("seq", "epoch", "retained", "members")

    def __init__(self, history_size: int) -> None:
        self.seq = 0
        self.epoch = secrets.token_urlsafe(6)  # a forgotten room that comes back starts a new sequence
        self.retained: deque[Outgoing] = deque(maxlen=history_size)
        self.members: dict[str, str] = {}

    @property
    def first_seq(self) -> int:
        return self.retained[0].message["seq"] if self.retained else self.seq + 1


class MemoryBroker(Broker):
    def __init__(self, config: Config) -> None:
        self.history_size = config.history_size
        self.max_rooms = config.max_rooms
        self._rooms: dict[str, RoomLog] = {}  # least recently created or posted to first
        self._nicks: dict[str, str] = {}
        self._listener: Listener | None = None
        self._dm_rates = RecipientRates(config.dm_rate, config.dm_burst)  # take_dm_token

    def start(self, listener: Listener) -> None:
        self._listener = listener

    def _log(self, room: str) -> RoomLog:
        log = self._rooms.get(room)
        if log is None:
            log = self._rooms[room] = RoomLog(self.history_size)
            if self.max_rooms and len(self._rooms) > self.max_rooms:
                self._evict_one()
        return log

    def _evict_one(self) -> None:
        """Forget the least recently used room that has no members, history and seq included.

        Without a cap, a client could grow memory without bound by posting to ever new
        rooms; a room forgotten this way starts again at seq 1, as a new room.
        """
        for name, log in self._rooms.items():
            if not log.members:
                del self._rooms[name]
                return

    def _forget_if_unused(self, room: str) -> None:
        """A room with no members and nothing retained is indistinguishable from a new one."""
        log = self._rooms.get(room)
        if log is not None and not log.members and not log.retained:
            del self._rooms[room]

    def claim_nick(self, nick_key: str, owner: str) -> bool:
        return self._nicks.setdefault(nick_key, owner) == owner

    def release_nick(self, nick_key: str, owner: str) -> None:
        if self._nicks.get(nick_key) == owner:
            del self._nicks[nick_key]

    def append(self, room: str, message: dict, session_id: str | None = None) -> Outgoing:
        log = self._rooms.pop(room, None)
        if log is not None:
            self._rooms[room] = log  # most recently used: evicted last
        log = self._log(room)
        log.seq += 1
        message["seq"] = log.seq
        out = Outgoing(message)
        log.retained.append(out)
        self._listener.deliver_room(room, out, None)
        return out

    def publish(self, room: str, out: Outgoing, exclude: str | None = None) -> None:
        self._listener.deliver_room(room, out, exclude)

    def send_dm(self, nick_key: str, out: Outgoing) -> bool:
        return self._listener.deliver_dm(nick_key, out)

    def room_seq(self, room: str) -> RoomPosition:
        log = self._rooms.get(room)
        return RoomPosition(0, 1, NO_EPOCH) if log is None else RoomPosition(log.seq, log.first_seq, log.epoch)

    def history(self, room: str, since: int, limit: int | None, until: int | None = None) -> list[Outgoing]:
        log = self._rooms.get(room)
        if log is None or not log.retained or since >= log.seq:
            return []  # also keeps a since beyond 64 bits away from islice
        first = log.first_seq
        start = max(0, since + 1 - first)
        stop = len(log.retained) if until is None else max(0, min(len(log.retained), until + 1 - first))
        if limit is not None:
            stop = min(stop, start + limit)
        return list(itertools.islice(log.retained, start, stop))

    def add_member(self, room: str, nick: str) -> None:
        self._log(room).members[nick.lower()] = nick

    def remove_member(self, room: str, nick: str) -> None:
        log = self._rooms.get(room)
        if log is not None:
            log.members.pop(nick.lower(), None)
            self._forget_if_unused(room)

    def members(self, room: str) -> list[str]:
        log = self._rooms.get(room)
        return [] if log is None else list(log.members.values())

    def rooms(self) -> list[dict]:
        return [{"room": name, "members": len(log.members), "seq": log.seq, "epoch": log.epoch}
                for name, log in self._rooms.items() if log.members]

    def room_count(self) -> int:
        return sum(1 for log in self._rooms.values() if log.members)

    def take_dm_token(self, nick_key: str) -> bool:
        return nick_key not in self._nicks or self._dm_rates.take(nick_key)
