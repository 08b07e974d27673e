"""The single-node broker: shared state in this process's memory.

Everything runs synchronously in the calling greenlet with no yield, so ``append`` fans a
message out to every member before the next message can take a seq: order without locks.

Rooms (PROTOCOL.md section 6). Every room kept is in exactly one of two maps: ``_live``
(rooms with members, which ``rooms`` and ``room_count`` read) or ``_idle`` (rooms without
members, least recently used first). A room enters ``_idle`` at the end when its last member
leaves and moves to the end when a message is posted to it, so the front of ``_idle`` is
both the room to forget at ``max_rooms`` and the one that has been idle longest for
``room_ttl``: forgetting either way pops from the front and never scans. Reading a room
(``history``, ``who``) is not use: a client that only reads cannot keep a room alive.
"""
from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict, deque

import gevent

from gochat import metrics
from gochat.broker import NO_EPOCH, Broker, Listener, RoomPosition, TooManyRooms
from gochat.config import Config
from gochat.limits import RecipientRates
from gochat.protocol import Outgoing

# The room_ttl sweep runs this many times per room_ttl, but never more often than every
# TTL_SWEEP_MIN_INTERVAL seconds (a tiny room_ttl must not make it spin): a room is forgotten
# between room_ttl and room_ttl + max(room_ttl / TTL_SWEEPS_PER_TTL, TTL_SWEEP_MIN_INTERVAL)
# seconds after its last use.
TTL_SWEEPS_PER_TTL = 10
TTL_SWEEP_MIN_INTERVAL = 0.05
TTL_SWEEP_BATCH = 1000  # rooms forgotten per loop turn: a mass expiry yields to the connections in between


class RoomLog:
    """One room's seq counter, retained messages and members (nick key -> nick, in join order)."""

    __slots__ = ("seq", "epoch", "retained", "members", "idle_since")

    def __init__(self, history_size: int) -> None:
        self.seq = 0
        self.epoch = secrets.token_urlsafe(6)  # a forgotten room that comes back starts a new sequence
        self.retained: deque[Outgoing] = deque(maxlen=history_size)
        self.members: dict[str, str] = {}
        self.idle_since = 0.0  # monotonic time of the last use while the room has no members

    @property
    def first_seq(self) -> int:
        return self.retained[0].message["seq"] if self.retained else self.seq + 1


class MemoryBroker(Broker):
    def __init__(self, config: Config) -> None:
        self.history_size = config.history_size
        self.max_rooms = config.max_rooms
        self.room_ttl = config.room_ttl
        self._rooms: dict[str, RoomLog] = {}  # every room kept: the union of _live and _idle
        self._live: dict[str, RoomLog] = {}
        self._idle: OrderedDict[str, RoomLog] = OrderedDict()
        self._nicks: dict[str, str] = {}
        self._listener: Listener | None = None
        self._dm_rates = RecipientRates(config.dm_rate, config.dm_burst)  # take_dm_token
        self._sweeper: gevent.Greenlet | None = None

    def start(self, listener: Listener) -> None:
        self._listener = listener
        if self.room_ttl > 0:
            interval = max(self.room_ttl / TTL_SWEEPS_PER_TTL, TTL_SWEEP_MIN_INTERVAL)
            self._sweeper = gevent.spawn(self._sweep_forever, interval)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
            self._sweeper = None

    # ------------------------------------------------------------ the room maps

    def _create(self, room: str) -> RoomLog:
        """A new room, making space at ``max_rooms`` by forgetting the least recently used idle one.

        The new room is not kept yet while space is made, so it can never be the one
        forgotten; with every room in use, nothing changes and the caller gets TooManyRooms.
        """
        if self.max_rooms and len(self._rooms) >= self.max_rooms:
            if not self._idle:
                raise TooManyRooms(room)
            name, _ = self._idle.popitem(last=False)
            del self._rooms[name]
            metrics.rooms_forgotten.inc("lru")
        log = self._rooms[room] = RoomLog(self.history_size)
        return log

    def _touch_idle(self, room: str, log: RoomLog) -> None:
        """Make a room without members the most recently used one."""
        log.idle_since = time.monotonic()
        self._idle[room] = log
        self._idle.move_to_end(room)

    def _sweep_forever(self, interval: float) -> None:
        while True:
            gevent.sleep(interval)
            while self._expire_idle(time.monotonic(), TTL_SWEEP_BATCH) == TTL_SWEEP_BATCH:
                gevent.sleep(0)

    def _expire_idle(self, now: float, most: int) -> int:
        """Forget up to ``most`` rooms idle for room_ttl by ``now``, oldest first; how many went.

        The cost is in proportion to what expires: the first room still young ends it.
        """
        expired = 0
        while self._idle and expired < most:
            name, log = next(iter(self._idle.items()))
            if now - log.idle_since < self.room_ttl:
                break
            del self._idle[name]
            del self._rooms[name]
            expired += 1
        metrics.rooms_forgotten.inc("ttl", expired)
        return expired

    # ------------------------------------------------------------ the broker interface

    def claim_nick(self, nick_key: str, owner: str) -> bool:
        return self._nicks.setdefault(nick_key, owner) == owner

    def release_nick(self, nick_key: str, owner: str) -> None:
        if self._nicks.get(nick_key) == owner:
            del self._nicks[nick_key]

    def append(self, room: str, message: dict, session_id: str | None = None) -> Outgoing:
        """Sequence a msg; a room without members (a publish by the server) becomes the most recently used."""
        log = self._rooms.get(room) or self._create(room)
        if not log.members:
            self._touch_idle(room, log)
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
        """Raises TooManyRooms when the room is new, ``max_rooms`` are kept and all have members."""
        log = self._rooms.get(room) or self._create(room)
        if not log.members:
            self._idle.pop(room, None)
            self._live[room] = log
        log.members[nick.lower()] = nick

    def remove_member(self, room: str, nick: str) -> None:
        """A room's last member left: forget it if it retains nothing, else it becomes idle."""
        log = self._rooms.get(room)
        if log is None or log.members.pop(nick.lower(), None) is None or log.members:
            return
        del self._live[room]
        if log.retained:
            self._touch_idle(room, log)
        else:
            del self._rooms[room]  # nothing to lose but its seq, and a new epoch tells clients so

    def members(self, room: str) -> list[str]:
        log = self._rooms.get(room)
        return [] if log is None else list(log.members.values())

    def rooms(self) -> list[dict]:
        return [{"room": name, "members": len(log.members), "seq": log.seq, "epoch": log.epoch}
                for name, log in self._live.items()]

    def room_count(self) -> int:
        return len(self._live)

    def take_dm_token(self, nick_key: str) -> bool:
        return nick_key not in self._nicks or self._dm_rates.take(nick_key)
