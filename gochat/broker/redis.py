"""The shared broker: Redis is the engine that makes several gochat nodes one chat service.

Data model (every key starts with ``gochat:``; docs/scaling.md has the full table with TTLs):

- ``room:{room}:pos`` a hash holding the room's latest ``seq`` and the ``epoch`` naming that
  sequence; ``room:{room}:log`` a Stream capped at ``history_size`` whose entry ids are
  ``0-{seq}``. One Lua script takes the seq, appends and PUBLISHes, so the order of seqs is
  the order every node receives them in (Redis runs scripts atomically and delivers one
  connection's pub/sub messages in order). The seq and its epoch live in one hash, created
  in one script step with a fresh epoch (and the log of any earlier epoch deleted), so they
  cannot expire apart and a restarted sequence always has a new epoch.
- ``room:{room}:members`` a sorted set of nicks scored by expiry (ms); the node holding a
  member refreshes it, so a node that dies leaves no ghosts after ``presence_ttl``.
- ``rooms:live`` a sorted set of the rooms with members, scored by expiry like the members:
  joins add, the leave of a room's last member removes, refreshes only renew. ``rooms`` and
  ``room_count`` read it, so they cost time in proportion to live rooms only.
- A room's keys carry TTLs renewed by activity (append, join, the refresh of a node with
  members there); its last member's leave sets them to ``room_ttl``, so a room without
  members and without new messages is forgotten after ``room_ttl`` (0: kept forever).
- ``nick:{key}`` the session id owning a nick: SET NX, TTL refreshed by its node.
- ``session:{id}`` hash (nick, rooms, holder node, live) and ``session:{id}:acks`` +
  ``:ackids`` (the last 1024 acked ids, trimmed by the scripts that add one), all with
  ``resume_window`` TTL: any node can resume.
- ``dmrate:{key}`` one recipient's DM budget (a token bucket shared by every node), kept
  only until it would be full again.
- channels ``room:{room}`` (msgs ``m {epoch} {seq} {json}``, presence ``p {exclude} {json}``)
  and ``node:{id}`` (``dm {nick} {json}``, ``moved {session}``).

Key names are built only from values the hub validated: room names (``ROOM_RE``, no blanks),
nick keys (``NICK_RE``), session ids (issued by the hub, or a resume value checked against
that format) and this node's own id.

Pub/sub is at-most-once, so it is only the fast path: each node remembers the epoch and the
last seq it delivered per room, and fills any gap (a late subscription, a reconnect after an
outage) from the Stream before delivering further; a msg of a new epoch starts the count
again from 0. One listener greenlet per node reads pub/sub, reconnects with jittered backoff
and resubscribes.
"""
from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import gevent
from gevent.event import Event
import redis
import ujson
from redis.backoff import ExponentialWithJitterBackoff

from gochat.broker import NO_EPOCH, AlreadyAcked, Broker, BrokerUnavailable, Listener, RoomPosition, SessionRecord
from gochat.config import Config, mask_url
from gochat.protocol import Outgoing

log = logging.getLogger("gochat.broker.redis")

PREFIX = "gochat:"
REFRESHES_PER_TTL = 3  # a claim is refreshed this often within its TTL: one lost refresh is harmless
# Expired entries of a members set or of the live index are trimmed this many presence_ttl
# after their expiry, and a members key outlives its newest member by as much: refreshes
# only renew what exists, so a node whose refresh ran late still finds its entries.
GRACE_TTLS = 1
LISTEN_POLL = 1.0  # seconds the listener waits for pub/sub before checking it should stop
SUBSCRIBE_TIMEOUT = 5.0  # seconds a join waits for Redis to confirm the room's subscription
ACKS_KEPT = 1024
EPOCH_BYTES = 6  # random bytes naming a sequence: 8 url-safe characters, as the memory broker's
MAX_STREAM_SEQ = 2**64 - 2  # stream ids are 64-bit: no seq can be beyond this
POOL_SIZE = 64  # Redis connections per node; greenlets beyond wait for one
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)

# Lua shared by the scripts. KEYS[1] pos, KEYS[2] log; epoch: a fresh random epoch.
# A missing pos hash means the room's sequence is new, expired or lost: it starts again
# with the new epoch, and a log left from an earlier epoch is dropped with it.
ENSURE_POS = """
local function ensure_pos(epoch)
  if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'seq', 0, 'epoch', epoch)
  end
end
"""

# Keep the last `kept` acked ids of a session: the newest is pushed left, the oldest dropped
# from the list and the hash in the same step.
TRIM_ACKS = """
local function trim_acks(acks, ackids, kept)
  while redis.call('LLEN', ackids) > kept do
    redis.call('HDEL', acks, redis.call('RPOP', ackids))
  end
end
"""

# KEYS: pos, log, channel, acks, ackids
# ARGV: message json (no seq), history_size, ack field ("" for none), "ts room", acks ttl (s),
#       acks kept, fresh epoch, room keys ttl (ms, 0: none)
# Returns "new {seq}", or the remembered "m {seq} {ts} {room}" of an id acked before.
APPEND = ENSURE_POS + TRIM_ACKS + """
if ARGV[3] ~= '' then
  local before = redis.call('HGET', KEYS[4], ARGV[3])
  if before then
    return before
  end
end
ensure_pos(ARGV[7])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local entry = seq .. ' ' .. ARGV[1]
local keep = tonumber(ARGV[2])
if keep > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', keep, '0-' .. seq, 'm', entry)
end
local ttl = tonumber(ARGV[8])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('PUBLISH', KEYS[3], 'm ' .. epoch .. ' ' .. entry)
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[3], 'm ' .. seq .. ' ' .. ARGV[4])
  redis.call('LPUSH', KEYS[5], ARGV[3])
  trim_acks(KEYS[4], KEYS[5], tonumber(ARGV[6]))
  redis.call('EXPIRE', KEYS[4], ARGV[5])
  redis.call('EXPIRE', KEYS[5], ARGV[5])
end
return 'new ' .. seq
"""

# KEYS: pos, log, members, live index
# ARGV: nick, member expiry (ms), room, fresh epoch, room keys ttl (ms, 0: none), members key ttl (ms)
# Returns {seq, epoch}: the room's sequence exists from its first join on.
JOIN = ENSURE_POS + """
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[4], 'GT', ARGV[2], ARGV[3])
ensure_pos(ARGV[4])
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return redis.call('HMGET', KEYS[1], 'seq', 'epoch')
"""

# KEYS: pos, log, members, live index
# ARGV: nick, now (ms), room, room_ttl (ms, 0: never), trim members expired before this (ms)
# The last live member's leave takes the room out of the index and starts its room_ttl; a
# room that retains nothing is forgotten at once (it is indistinguishable from a new one).
LEAVE = """
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[5])
if redis.call('ZCOUNT', KEYS[3], ARGV[2], '+inf') > 0 then
  return 0
end
redis.call('ZREM', KEYS[4], ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
elseif tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return 1
"""

# KEYS: acks, ackids ; ARGV: ack field, ack, ttl (s), acks kept
REMEMBER_ACK = TRIM_ACKS + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[1])
trim_acks(KEYS[1], KEYS[2], tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
"""

# KEYS: nick ; ARGV: owner, ttl (ms). Claim a free nick, or keep one this owner holds.
CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: nick ; ARGV: owner. Free a nick only if this owner still holds it.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: bucket, nick ; ARGV: rate (tokens/s), burst. The DM budget of one recipient, shared by
# every node and timed by Redis's clock (nodes' clocks may differ). The key holds "tokens ms"
# and lives only until the bucket would be full again: a missing key is a full bucket.
# Returns 1 if a token was taken, or if nobody holds the nick (no key is made); 0 if empty.
DM_TOKEN = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 1
end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local tokens = burst
local state = redis.call('GET', KEYS[1])
if state then
  local space = string.find(state, ' ', 1, true)
  local stamp = tonumber(string.sub(state, space + 1))
  tokens = math.min(burst, tonumber(string.sub(state, 1, space - 1)) + math.max(0, now - stamp) * rate / 1000)
end
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('SET', KEYS[1], tokens .. ' ' .. now, 'PX', math.ceil((burst - tokens) * 1000 / rate) + 1)
return taken
"""

LIVE_ROOMS = "rooms:live"


def _k(*parts: str) -> str:
    return PREFIX + ":".join(parts)


def _new_epoch() -> str:
    """A candidate epoch for the scripts, used only if they start a sequence.

    Made here because scripts should be deterministic, and Redis's Lua math.random is not a
    source of unpredictable names.
    """
    return secrets.token_urlsafe(EPOCH_BYTES)


def _parse_entry(room: str, entry: str) -> tuple[int, Outgoing]:
    seq_text, _, body = entry.partition(" ")
    message = ujson.loads(body)
    message["seq"] = int(seq_text)
    return message["seq"], Outgoing(message)


def _ack_from(rid: Any, remembered: str) -> dict:
    """An ack as stored in ``session:{id}:acks``: ``m {seq} {ts} {room}`` or ``d {ts}``."""
    kind, _, rest = remembered.partition(" ")
    if kind == "m":
        seq, ts, room = rest.split(" ", 2)
        return {"type": "ack", "room": room, "seq": int(seq), "ts": int(ts), "id": rid}
    return {"type": "ack", "ts": int(rest), "id": rid}


class RedisBroker(Broker):
    def __init__(self, config: Config) -> None:
        url = self.url = config.broker
        self.history_size = config.history_size
        self.resume_window = config.resume_window
        self.presence_ttl = config.presence_ttl
        self.room_ttl_ms = int(config.room_ttl * 1000)
        # while a room has members its keys are renewed by refreshes, each one presence_ttl
        # apart at most: they must outlive that, whatever room_ttl is
        self.room_keep_ms = self.room_ttl_ms + int(config.presence_ttl * 1000) if config.room_ttl else 0
        self.node = secrets.token_hex(8)
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=5, decode_responses=True, socket_timeout=5,
            socket_connect_timeout=2, health_check_interval=10)
        self.redis = redis.Redis(connection_pool=pool)
        self._append = self.redis.register_script(APPEND)
        self._join = self.redis.register_script(JOIN)
        self._leave = self.redis.register_script(LEAVE)
        self._remember_ack = self.redis.register_script(REMEMBER_ACK)
        self._claim = self.redis.register_script(CLAIM)
        self._release = self.redis.register_script(RELEASE)
        self.dm_rate, self.dm_burst = config.dm_rate, config.dm_burst  # take_dm_token
        self._dm_token = self.redis.register_script(DM_TOKEN)
        self._listener: Listener | None = None
        self._up = False
        self._running = False
        self._greenlets: list[gevent.Greenlet] = []
        # this node's claims, refreshed every REFRESH_INTERVAL
        self._nicks: dict[str, str] = {}  # nick key -> owner session
        self._members: dict[str, dict[str, int]] = {}  # room -> nick -> local references
        self._live_sessions: set[str] = set()
        # pub/sub state: the listener greenlet reads, joins and leaves (un)subscribe
        self._pubsub: Any = None
        self._delivered: dict[str, int] = {}  # room -> last seq delivered on this node
        self._epochs: dict[str, str] = {}  # room -> the epoch of that seq
        self._subscribed: dict[str, Event] = {}  # room -> set once Redis confirmed the subscription

    # ------------------------------------------------------------ life cycle

    def start(self, listener: Listener) -> None:
        self._listener = listener
        self._running = True
        try:
            self.redis.ping()
            self._up = True
        except REDIS_ERRORS as exc:
            log.warning("redis at %s unreachable at start (%s); retrying in the background", mask_url(self.url), exc)
        self._greenlets = [gevent.spawn(self._listen), gevent.spawn(self._refresh_loop)]

    def stop(self) -> None:
        self._running = False
        gevent.killall(self._greenlets, block=True, timeout=2)
        self.redis.connection_pool.disconnect()

    @property
    def available(self) -> bool:
        return self._up

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one Redis operation; an unreachable Redis becomes BrokerUnavailable."""
        try:
            result = fn(*args, **kwargs)
        except REDIS_ERRORS as exc:
            if self._up:
                log.warning("redis unreachable: %s", exc)
            self._up = False
            raise BrokerUnavailable(str(exc)) from None
        return result

    # ------------------------------------------------------------ nicks

    def claim_nick(self, nick_key: str, owner: str) -> bool:
        if not self._call(self._claim, keys=[_k("nick", nick_key)], args=[owner, int(self.presence_ttl * 1000)]):
            return False
        self._nicks[nick_key] = owner
        return True

    def release_nick(self, nick_key: str, owner: str) -> None:
        self._nicks.pop(nick_key, None)
        self._call(self._release, keys=[_k("nick", nick_key)], args=[owner])

    # ------------------------------------------------------------ rooms

    def append(self, room: str, message: dict, session_id: str | None = None) -> Outgoing:
        message.pop("seq", None)
        rid = message.get("id")
        ack_field = ujson.dumps(rid) if (session_id and rid is not None) else ""
        keys = [_k("room", room, "pos"), _k("room", room, "log"), _k("room", room),
                _k("session", session_id or "-", "acks"), _k("session", session_id or "-", "ackids")]
        args = [ujson.dumps(message, ensure_ascii=False), self.history_size, ack_field,
                f"{message['ts']} {room}", self._acks_ttl(), ACKS_KEPT, _new_epoch(), self.room_keep_ms]
        result = self._call(self._append, keys=keys, args=args)
        kind, _, rest = result.partition(" ")
        if kind != "new":
            raise AlreadyAcked(_ack_from(rid, result))
        message["seq"] = int(rest)
        return Outgoing(message)

    def publish(self, room: str, out: Outgoing, exclude: str | None = None) -> None:
        payload = f"p {exclude or '-'} {ujson.dumps(out.message, ensure_ascii=False)}"
        self._call(self.redis.publish, _k("room", room), payload)

    def room_seq(self, room: str) -> RoomPosition:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(_k("room", room, "pos"), "seq", "epoch")
        pipe.xrange(_k("room", room, "log"), count=1)
        (latest, epoch), first = self._call(pipe.execute)
        seq = int(latest or 0)
        first_seq = int(first[0][0].split("-")[1]) if first else seq + 1
        return RoomPosition(seq, min(first_seq, seq + 1), epoch or NO_EPOCH)

    def live_seq(self, room: str) -> int:
        delivered = self._delivered.get(room)
        return self.room_seq(room)[0] if delivered is None else delivered

    def history(self, room: str, since: int, limit: int | None, until: int | None = None) -> list[Outgoing]:
        if (until is not None and until <= since) or since >= MAX_STREAM_SEQ:
            return []  # a since beyond any stream id means nothing newer
        entries = self._call(self.redis.xrange, _k("room", room, "log"), min=f"0-{since + 1}",
                             max="+" if until is None else f"0-{until}", count=limit)
        return [_parse_entry(room, fields["m"])[1] for _, fields in entries]

    def add_member(self, room: str, nick: str) -> None:
        local = self._members.setdefault(room, {})
        first_here = not local
        seq, epoch = self._call(self._join, keys=self._room_keys(room),
                                args=[nick, self._expiry_ms(), room, _new_epoch(), self.room_keep_ms,
                                      int(self.presence_ttl * 1000) * (1 + GRACE_TTLS)])
        local[nick] = local.get(nick, 0) + 1
        if first_here:
            self._delivered[room] = int(seq)
            self._epochs[room] = epoch
            self._subscribe(room)

    def _subscribe(self, room: str) -> None:
        """Subscribe to a room's channel and wait until Redis confirms it.

        Presence is not retained, so a join must not return before this node hears the
        room: otherwise the presence of the next member to join could be missed.
        """
        confirmed = self._subscribed.setdefault(room, Event())
        pubsub = self._pubsub
        if pubsub is None:
            raise BrokerUnavailable("redis pub/sub is reconnecting")
        self._call(pubsub.subscribe, _k("room", room))
        if not confirmed.wait(SUBSCRIBE_TIMEOUT):
            raise BrokerUnavailable("redis did not confirm a subscription")

    def remove_member(self, room: str, nick: str) -> None:
        local = self._members.get(room, {})
        if nick in local:
            local[nick] -= 1
            if local[nick] <= 0:
                del local[nick]
        if not local and room in self._members:
            self._unsubscribe(room)
        now = self._now_ms()
        self._call(self._leave, keys=self._room_keys(room),
                   args=[nick, now, room, self.room_ttl_ms, now - int(self.presence_ttl * 1000) * GRACE_TTLS])

    @staticmethod
    def _room_keys(room: str) -> list[str]:
        """The keys of the JOIN and LEAVE scripts."""
        return [_k("room", room, "pos"), _k("room", room, "log"), _k("room", room, "members"), _k(LIVE_ROOMS)]

    def _unsubscribe(self, room: str) -> None:
        del self._members[room]
        self._delivered.pop(room, None)
        self._epochs.pop(room, None)
        self._subscribed.pop(room, None)
        if self._pubsub is not None:
            try:
                self._pubsub.unsubscribe(_k("room", room))
            except REDIS_ERRORS:
                pass  # the reconnect subscribes only to rooms with members here

    def forget_member(self, room: str, nick: str) -> None:
        """Stop refreshing a member another node took over, without touching Redis."""
        local = self._members.get(room, {})
        local.pop(nick, None)
        if not local and room in self._members:
            self._unsubscribe(room)

    def members(self, room: str) -> list[str]:
        return self._call(self.redis.zrangebyscore, _k("room", room, "members"), self._now_ms(), "+inf")

    def rooms(self) -> list[dict]:
        now = self._now_ms()
        names = sorted(self._call(self.redis.zrangebyscore, _k(LIVE_ROOMS), now, "+inf"))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.zcount(_k("room", name, "members"), now, "+inf")
            pipe.hmget(_k("room", name, "pos"), "seq", "epoch")
        counts = self._call(pipe.execute)
        listing = []
        for i, name in enumerate(names):
            members, (seq, epoch) = int(counts[2 * i]), counts[2 * i + 1]
            if members:  # the index may still hold a room whose last member's node died
                listing.append({"room": name, "members": members, "seq": int(seq or 0),
                                "epoch": epoch or NO_EPOCH})
        return listing

    def room_count(self) -> int:
        return int(self._call(self.redis.zcount, _k(LIVE_ROOMS), self._now_ms(), "+inf"))

    # ------------------------------------------------------------ DMs and sessions

    def send_dm(self, nick_key: str, out: Outgoing) -> bool:
        owner = self._call(self.redis.get, _k("nick", nick_key))
        if owner is None:
            return False
        holder, live = self._call(self.redis.hmget, _k("session", owner), "holder", "live")
        if live != "1" or not holder:
            return False
        if holder == self.node:
            return self._listener.deliver_dm(nick_key, out)
        payload = f"dm {nick_key} {ujson.dumps(out.message, ensure_ascii=False)}"
        return bool(self._call(self.redis.publish, _k("node", holder), payload))

    def save_session(self, session_id: str, nick: str, rooms: list[str], live: bool, ttl: float,
                     resumable: bool = True) -> None:
        key = _k("session", session_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={"nick": nick, "rooms": ujson.dumps(rooms), "holder": self.node,
                                "live": "1" if live else "0", "resumable": "1" if resumable else "0"})
        pipe.expire(key, max(1, int(self.resume_window if live else ttl) + 1))
        self._call(pipe.execute)
        if live:
            self._live_sessions.add(session_id)
        else:
            self._live_sessions.discard(session_id)

    def load_session(self, session_id: str) -> SessionRecord | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(_k("session", session_id))
        pipe.hgetall(_k("session", session_id, "acks"))
        record, acks = self._call(pipe.execute)
        if not record or record.get("resumable") != "1":
            return None
        remembered = {}
        for field, value in acks.items():
            rid = ujson.loads(field)
            remembered[rid] = _ack_from(rid, value)
        holder = record.get("holder") or None
        return SessionRecord(record["nick"], ujson.loads(record.get("rooms", "[]")), remembered, holder)

    def session_taken(self, holder: str | None, session_id: str) -> None:
        if holder and holder != self.node:
            self._call(self.redis.publish, _k("node", holder), f"moved {session_id}")

    def forget_session(self, session_id: str, nick_key: str, nick: str, rooms: list[str]) -> None:
        self._live_sessions.discard(session_id)
        self._nicks.pop(nick_key, None)
        for room in rooms:
            self.forget_member(room, nick)

    def drop_session(self, session_id: str) -> None:
        self._live_sessions.discard(session_id)
        self._call(self.redis.delete, _k("session", session_id), _k("session", session_id, "acks"),
                   _k("session", session_id, "ackids"))

    def remember_dm_ack(self, session_id: str, rid: Any, ack: dict) -> None:
        keys = [_k("session", session_id, "acks"), _k("session", session_id, "ackids")]
        self._call(self._remember_ack, keys=keys,
                   args=[ujson.dumps(rid), f"d {ack['ts']}", self._acks_ttl(), ACKS_KEPT])

    def _acks_ttl(self) -> int:
        """Seconds a session's acks are kept: past its resume window, so a late resume still finds them."""
        return max(1, int(self.resume_window) + 60)

    # ------------------------------------------------------------ the listener greenlet

    def _listen(self) -> None:
        """Read pub/sub for this node's rooms and its own channel; reconnect and catch up on failure."""
        backoff = ExponentialWithJitterBackoff(cap=2.0, base=0.05)
        failures = 0
        while self._running:
            pubsub = self.redis.pubsub()
            try:
                for event in self._subscribed.values():
                    event.clear()
                pubsub.subscribe(_k("node", self.node), *(_k("room", room) for room in self._members))
                self._pubsub = pubsub
                self._up = True
                failures = 0
                while self._running:
                    message = pubsub.get_message(timeout=LISTEN_POLL)
                    if message is not None:
                        self._on_pubsub(message)
            except REDIS_ERRORS as exc:
                if self._up:
                    log.warning("redis pub/sub lost: %s", exc)
                self._up = False
                failures += 1
                gevent.sleep(backoff.compute(failures))
            finally:
                self._pubsub = None
                try:
                    pubsub.close()
                except REDIS_ERRORS:
                    pass

    def _on_pubsub(self, message: dict) -> None:
        kind, channel, data = message["type"], message["channel"], message["data"]
        room_prefix = _k("room", "")
        if kind == "subscribe" and channel.startswith(room_prefix):
            room = channel[len(room_prefix):]
            self._catch_up(room)
            confirmed = self._subscribed.get(room)
            if confirmed is not None:
                confirmed.set()
        elif kind == "message" and channel.startswith(room_prefix):
            self._on_room_event(channel[len(room_prefix):], data)
        elif kind == "message":
            self._on_node_event(data)

    def _on_room_event(self, room: str, data: str) -> None:
        if room not in self._delivered:
            return
        tag, _, rest = data.partition(" ")
        if tag == "p":
            exclude, _, body = rest.partition(" ")
            self._listener.deliver_room(room, Outgoing(ujson.loads(body)), None if exclude == "-" else exclude)
            return
        epoch, _, entry = rest.partition(" ")
        seq, out = _parse_entry(room, entry)
        if epoch != self._epochs.get(room):
            self._epochs[room] = epoch  # the room's sequence started again: its seqs count from 0
            self._delivered[room] = 0
        if seq <= self._delivered[room]:
            return
        if seq > self._delivered[room] + 1:
            self._catch_up(room, upto=seq - 1)
        self._delivered[room] = seq
        self._listener.deliver_room(room, out, None)

    def _catch_up(self, room: str, upto: int | None = None) -> None:
        """Deliver retained msgs this node missed (pub/sub dropped them, or came before the subscription)."""
        last = self._delivered.get(room)
        if last is None:
            return
        for out in self.history(room, last, None, upto):
            seq = out.message["seq"]
            if seq > self._delivered.get(room, seq):
                self._delivered[room] = seq
                self._listener.deliver_room(room, out, None)

    def _on_node_event(self, data: str) -> None:
        tag, _, rest = data.partition(" ")
        if tag == "dm":
            nick_key, _, body = rest.partition(" ")
            self._listener.deliver_dm(nick_key, Outgoing(ujson.loads(body)))
        elif tag == "moved":
            self._listener.session_moved(rest)

    # ------------------------------------------------------------ refreshing claims

    def _refresh_loop(self) -> None:
        while self._running:
            gevent.sleep(self.presence_ttl / REFRESHES_PER_TTL)
            try:
                self._refresh()
                if not self._up:
                    self.redis.ping()
                    self._up = True
            except REDIS_ERRORS as exc:
                self._up = False
                log.debug("refresh failed: %s", exc)

    def _refresh(self) -> None:
        """Renew this node's claims; never create one (a member that left meanwhile stays gone).

        Also trims the live index of rooms whose members' nodes all stopped refreshing.
        """
        pipe = self.redis.pipeline(transaction=False)
        now = self._now_ms()
        ttl_ms = int(self.presence_ttl * 1000)
        expiry = now + ttl_ms
        for nick_key, owner in self._nicks.items():
            pipe.pexpire(_k("nick", nick_key), ttl_ms)
        live = {room: expiry for room, nicks in self._members.items() if nicks}
        for room in live:
            pipe.zadd(_k("room", room, "members"), dict.fromkeys(self._members[room], expiry), xx=True)
            pipe.pexpire(_k("room", room, "members"), ttl_ms * (1 + GRACE_TTLS))
            if self.room_keep_ms:
                pipe.pexpire(_k("room", room, "pos"), self.room_keep_ms)
                pipe.pexpire(_k("room", room, "log"), self.room_keep_ms)
        if live:
            pipe.zadd(_k(LIVE_ROOMS), live, xx=True, gt=True)
        pipe.zremrangebyscore(_k(LIVE_ROOMS), "-inf", f"({now - ttl_ms * GRACE_TTLS}")
        for session_id in self._live_sessions:
            pipe.expire(_k("session", session_id), int(self.resume_window) + 1)
        pipe.execute()

    @staticmethod
    def _now_ms() -> int:
        return int(time.time() * 1000)

    def _expiry_ms(self) -> int:
        return self._now_ms() + int(self.presence_ttl * 1000)

    # ------------------------------------------------------------ the DM rate per recipient

    def take_dm_token(self, nick_key: str) -> bool:
        if not self.dm_rate:
            return True
        return bool(self._call(self._dm_token, keys=[_k("dmrate", nick_key), _k("nick", nick_key)],
                               args=[self.dm_rate, self.dm_burst]))
