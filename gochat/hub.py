"""The hub of one node: sessions, their room memberships, and fan-out to local connections.

Ownership (the gorilla ``hub.go`` rule): only the hub reads or writes ``Session`` objects
and the local member maps; connections call the hub's methods and receive ``Outgoing``
messages through ``deliver``, never touching each other. Shared state (nicks, seqs,
history, membership lists) lives in the broker, so a Redis broker makes several hubs one
service. Every method runs to completion without yielding, so with the memory broker a
room's messages reach every member in seq order without locks.

Session rules:

1. A session is created by ``hello`` and holds a nick until ``bye``, or until it has been
   detached (no live connection) for ``resume_window`` seconds; then it goes offline.
2. A detached session stays a member of its rooms (``who`` lists it) but receives nothing;
   on resume it gets live messages again and, through ``join`` with ``since``, exactly the
   ones it missed: replay stops at the seq the room had when the session was resumed.
3. Text-mode sessions cannot resume: they go offline when their connection ends.
4. A node holds at most ``max_sessions`` sessions, live and detached together: a session
   that would exceed it ends the one detached longest ago (offline presence, nick freed).
   Live sessions are never ended for it (``max_connections`` bounds those), so the
   detached ones are at most ``max_sessions``. Without the cap, connect + hello + join +
   close in a loop would keep a ghost per cycle for ``resume_window``.
"""
from __future__ import annotations

import logging
import re
import secrets
import time
from collections import OrderedDict
from typing import Any, Callable, Protocol

import gevent

from gochat import metrics
from gochat.broker import AlreadyAcked, Broker, BrokerUnavailable, TooManyRooms
from gochat.config import Config
from gochat.outbox import RoomFeed
from gochat.protocol import DEFAULT_HISTORY_LIMIT, NICK_RE, Outgoing, ProtocolError

log = logging.getLogger("gochat.hub")

REMEMBERED_ACKS = 1024  # per session; msg and dm ids share the space (PROTOCOL.md section 5)
SESSION_ID_BYTES = 24  # secrets.token_urlsafe: 192 random bits, a bearer credential
# What token_urlsafe(SESSION_ID_BYTES) returns: 4 base64url characters per 3 bytes, no padding.
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{%d}\Z" % (SESSION_ID_BYTES * 4 // 3))


def now_ms() -> int:
    return int(time.time() * 1000)


class Peer(Protocol):
    """The side of a connection the hub may use."""

    def deliver(self, out: Outgoing) -> None: ...

    def follow(self, feed: RoomFeed) -> None: ...

    def unfollow(self, feed: RoomFeed) -> None: ...

    def takeover(self) -> None: ...


class Turns(Protocol):
    """The event-loop turn that writes output (conn.Flusher)."""

    def at_turn_end(self, callback: Callable[[], None]) -> None: ...

    def request(self) -> None: ...


class RecipientRateLimited(ProtocolError):
    """A DM over its recipient's ``dm_rate``: ``rate_limited``, and a strike on the sender's connection.

    The recipient's limit protects the recipient: DMs from many senders, each inside its own
    rate, would otherwise outrun any reader and drop it as a slow consumer.
    """

    def __init__(self, to: str) -> None:
        super().__init__("rate_limited", f"too many DMs to {to} right now, slow down")


class Session:
    """A nick's presence on this node; survives its connection for ``resume_window``."""

    __slots__ = ("id", "nick", "key", "resumable", "rooms", "acks", "peer", "resume_marks", "expiry")

    def __init__(self, nick: str, resumable: bool, session_id: str | None = None) -> None:
        self.id = session_id or secrets.token_urlsafe(SESSION_ID_BYTES)
        self.nick = nick
        self.key = nick.lower()
        self.resumable = resumable
        self.rooms: dict[str, None] = {}  # ordered: the last is the most recently joined
        self.acks: OrderedDict[Any, dict] = OrderedDict()
        self.peer: Peer | None = None
        self.resume_marks: dict[str, int] = {}
        self.expiry: gevent.Greenlet | None = None

    @property
    def current_room(self) -> str | None:
        return next(reversed(self.rooms), None)

    def cancel_expiry(self) -> None:
        """Stop the resume-window timer, if one runs (resumed, ended, moved or shut down)."""
        if self.expiry is not None:
            self.expiry.kill(block=False)
            self.expiry = None

    def remember_ack(self, rid: Any, ack: dict) -> None:
        self.acks[rid] = ack
        if len(self.acks) > REMEMBERED_ACKS:
            self.acks.popitem(last=False)

    def replayed_ack(self, rid: Any) -> dict | None:
        ack = self.acks.get(rid) if rid is not None else None
        return None if ack is None else {**ack, "dup": True}


class Hub:
    def __init__(self, broker: Broker, turns: Turns, config: Config,
                 authenticate: Callable[[str], str] | None = None) -> None:
        self.broker = broker
        self.turns = turns
        self.config = config
        self.resume_window = config.resume_window
        self.history_size = config.history_size
        self.authenticate = authenticate
        self.sessions: dict[str, Session] = {}  # by session id
        # Sessions awaiting resume, the longest detached first: rule 4 ends the first in O(1).
        self.detached: OrderedDict[str, Session] = OrderedDict()
        # None only for a Hub built without a Server (which derives the default): no cap.
        self.max_sessions = config.max_sessions
        self.by_nick: dict[str, Session] = {}  # by nick key, local sessions only
        self.local_members: dict[str, dict[str, Session]] = {}  # room -> nick key -> session
        self.feeds: dict[str, RoomFeed] = {}  # room -> its msgs of this turn (outbox.py)
        self.messages_posted = 0
        self.deliveries = 0
        turns.at_turn_end(self.feeds.clear)  # written out: the next msg starts a new feed
        broker.start(self)

    # ------------------------------------------------------------ sessions

    def hello(self, nick: str | None, token: str | None, resume: str | None, peer: Peer,
              resumable: bool) -> Session:
        """Start or resume a session for ``peer``; raises the session-start errors of section 2."""
        if resume is not None:
            return self._resume(resume, peer)
        if self.authenticate is not None:
            nick = self.authenticate(token or "")
        elif nick is None:
            raise ProtocolError("bad_request", "hello needs a nick")
        if not NICK_RE.match(nick):
            raise ProtocolError("bad_nick", f"bad nick {nick[:40]!r}")
        session = Session(nick, resumable)
        if not self.broker.claim_nick(session.key, session.id):
            raise ProtocolError("nick_taken", f"nick {nick!r} is in use")
        session.peer = peer
        self.sessions[session.id] = session
        self.by_nick[session.key] = session
        try:
            self._save(session)
        except BrokerUnavailable:
            self._forget(session)  # the client was told unavailable: no session may stay behind
            raise
        self._end_sessions_over_cap()
        return session

    def _resume(self, session_id: str, peer: Peer) -> Session:
        """Take a session back; any broker failure leaves it awaiting resume, as before the hello."""
        if not SESSION_ID_RE.match(session_id):
            # The value is the client's: checked against what the hub issues before it names
            # a lookup or a key (a shared broker builds key names from it).
            raise ProtocolError("bad_session", "not a session this server issued")
        session = self.sessions.get(session_id)
        if session is None:
            session = self._adopt(session_id)
        if not session.resumable:
            raise ProtocolError("bad_session")
        marks = {room: self.broker.live_seq(room) for room in session.rooms}
        session.cancel_expiry()
        self.detached.pop(session.id, None)
        if session.peer is not None:
            session.peer.takeover()
        session.peer = peer
        session.resume_marks = marks
        for room in session.rooms:
            self._follow(peer, room)
        try:
            self._save(session)
        except BrokerUnavailable:
            self.detach(session, peer)
            raise
        self._end_sessions_over_cap()
        return session

    def _adopt(self, session_id: str) -> Session:
        """Take over a session another node held (a shared broker): nick, rooms and acks.

        Once its nick is claimed here the session awaits resume on this node like any
        detached session (its resume window restarts), so a failure further on leaves
        nothing that would not expire.
        """
        record = self.broker.load_session(session_id)
        if record is None:
            raise ProtocolError("bad_session")
        session = Session(record.nick, True, session_id)
        if not self.broker.claim_nick(session.key, session.id):
            raise ProtocolError("bad_session", "the session expired and its nick was taken")
        session.acks.update(record.acks)
        self.sessions[session.id] = session
        self.by_nick[session.key] = session
        for room in record.rooms:
            session.rooms[room] = None
            self.local_members.setdefault(room, {})[session.key] = session
        self._await_resume(session)
        self.broker.session_taken(record.node, session_id)
        for room in record.rooms:
            self.broker.add_member(room, session.nick)
        return session

    def session_moved(self, session_id: str) -> None:
        """Another node resumed a session held here: let go of it without a word to its rooms."""
        session = self.sessions.get(session_id)
        if session is None:
            return
        if session.peer is not None:
            session.peer.takeover()
            session.peer = None
        self._forget(session)

    def _forget(self, session: Session) -> None:
        """Drop a session here without a word to its rooms; its shared claims are left to expire."""
        self.sessions.pop(session.id, None)
        self.detached.pop(session.id, None)
        session.cancel_expiry()
        if self.by_nick.get(session.key) is session:
            del self.by_nick[session.key]
        for room in session.rooms:
            self._drop_local_member(session, room)
        self.broker.forget_session(session.id, session.key, session.nick, list(session.rooms))

    def _save(self, session: Session) -> None:
        """Record the session with the broker: DMs find it there, and any node can resume it."""
        self.broker.save_session(session.id, session.nick, list(session.rooms), session.peer is not None,
                                 self.resume_window, session.resumable)

    def detach(self, session: Session, peer: Peer) -> None:
        """The connection of ``session`` ended without ``bye``: keep it for resume (rule 1)."""
        if session.peer is not peer:
            return  # taken over by a newer connection
        for room in session.rooms:
            self._unfollow(peer, room)
        session.peer = None
        if not session.resumable or self.resume_window <= 0:
            self.end(session)
        else:
            self._await_resume(session)
            self._save(session)

    def _await_resume(self, session: Session) -> None:
        session.expiry = gevent.spawn_later(self.resume_window, self._expire, session)
        self.detached[session.id] = session

    def _end_sessions_over_cap(self) -> None:
        """Rule 4: while this node holds more than ``max_sessions``, end the longest detached."""
        if self.max_sessions is None:
            return
        while len(self.sessions) > self.max_sessions and self.detached:
            _, oldest = self.detached.popitem(last=False)
            metrics.sessions_ended_at_cap.inc()
            self._end_detached(oldest)

    def _expire(self, session: Session) -> None:
        session.expiry = None  # this greenlet is the timer: ending the session must not kill it
        self._end_detached(session)

    def _end_detached(self, session: Session) -> None:
        """End a session no connection is waiting on: nobody to answer ``unavailable`` to."""
        try:
            self.end(session)
        except BrokerUnavailable:
            log.warning("could not end session of %s: broker unavailable; its claims expire on their own",
                        session.nick)

    def end(self, session: Session) -> None:
        """``bye``, an expired resume window or rule 4: the nick goes offline in every room."""
        if self.sessions.pop(session.id, None) is None:
            return
        self.detached.pop(session.id, None)
        session.cancel_expiry()
        session.peer = None
        self.by_nick.pop(session.key, None)
        for room in list(session.rooms):
            self._remove_member(session, room)
            self.broker.publish(room, Outgoing({"type": "presence", "room": room, "nick": session.nick,
                                                "status": "offline"}), session.key)
        self.broker.release_nick(session.key, session.id)
        self.broker.drop_session(session.id)

    def stop(self) -> None:
        """Cancel the resume timers this hub owns (server shutdown)."""
        for session in self.sessions.values():
            session.cancel_expiry()

    # ------------------------------------------------------------ requests

    def join(self, session: Session, room: str, since: int | None) -> tuple[dict, list[Outgoing]]:
        """The ``joined`` reply and the replay (rule 2) for a join request."""
        if room in session.rooms:
            del session.rooms[room]  # re-joining makes it the most recent room again
            session.rooms[room] = None
            upto = session.resume_marks.pop(room, None)
        else:
            self._add_member(session, room)
            session.rooms[room] = None
            self.local_members.setdefault(room, {})[session.key] = session
            if session.peer is not None:
                self._follow(session.peer, room)
            upto = None
            try:
                self.broker.publish(room, Outgoing({"type": "presence", "room": room, "nick": session.nick,
                                                    "status": "join"}), session.key)
                self._save(session)
            except BrokerUnavailable:
                self._remove_member(session, room, shared=False)  # as if the join never happened
                raise
        position = self.broker.room_seq(room)
        joined = {"type": "joined", "room": room, "seq": position.seq, "first_seq": position.first_seq,
                  "epoch": position.epoch, "members": self.broker.members(room)}
        # Replay stops where live delivery to this member starts: nothing arrives twice.
        if since is None:
            replay = []
        else:
            replay = self.broker.history(room, since, None, self.broker.live_seq(room) if upto is None else upto)
        return joined, replay

    def _add_member(self, session: Session, room: str) -> None:
        """Make ``session`` a member of a room it is not in, or refuse with nothing changed (section 6)."""
        cap = self.config.max_rooms_per_session
        if cap and len(session.rooms) >= cap:
            raise ProtocolError("too_many_rooms", f"a session may be in at most {cap} rooms; leave one first")
        try:
            self.broker.add_member(room, session.nick)
        except TooManyRooms:
            raise ProtocolError("too_many_rooms", "the server keeps no more rooms; join an existing one") from None

    def leave(self, session: Session, room: str) -> None:
        if room not in session.rooms:
            raise ProtocolError("not_in_room", f"not in room {room}")
        self._remove_member(session, room)
        self._save(session)
        self.broker.publish(room, Outgoing({"type": "presence", "room": room, "nick": session.nick,
                                            "status": "leave"}), session.key)

    def _remove_member(self, session: Session, room: str, shared: bool = True) -> None:
        """Take a session out of a room here and, if ``shared``, in the broker too."""
        session.rooms.pop(room, None)
        session.resume_marks.pop(room, None)
        if session.peer is not None:
            self._unfollow(session.peer, room)
        self._drop_local_member(session, room)
        if shared:
            self.broker.remove_member(room, session.nick)
        else:
            self.broker.forget_member(room, session.nick)

    def _drop_local_member(self, session: Session, room: str) -> None:
        members = self.local_members.get(room)
        if members is not None and members.get(session.key) is session:
            del members[session.key]
            if not members:
                del self.local_members[room]

    def post(self, session: Session, room: str, text: str, rid: Any) -> dict:
        """Sequence, retain and fan out a msg; the returned ack is the promise of section 3."""
        dup = session.replayed_ack(rid)
        if dup is not None:
            return dup
        if room not in session.rooms:
            raise ProtocolError("not_in_room", f"not in room {room}")
        ts = now_ms()
        message = {"type": "msg", "room": room, "from": session.nick, "text": text, "seq": 0, "ts": ts}
        if rid is not None:
            message["id"] = rid
        try:
            out = self.broker.append(room, message, session.id if session.resumable else None)
        except AlreadyAcked as dup:
            session.remember_ack(rid, dup.ack)
            return {**dup.ack, "dup": True}
        ack = {"type": "ack", "room": room, "seq": out.message["seq"], "ts": ts}
        if rid is not None:
            ack["id"] = rid
            session.remember_ack(rid, ack)
        self.messages_posted += 1
        return ack

    def dm(self, session: Session, to: str, text: str, rid: Any) -> dict:
        dup = session.replayed_ack(rid)
        if dup is not None:
            return dup
        if not NICK_RE.match(to):  # before the recipient names any key
            raise ProtocolError("no_such_user", f"{to[:40]!r} is not online")
        if not self.broker.take_dm_token(to.lower()):
            metrics.dms_rate_limited.inc()
            raise RecipientRateLimited(to)
        ts = now_ms()
        out = Outgoing({"type": "dm", "from": session.nick, "text": text, "ts": ts})
        if not self.broker.send_dm(to.lower(), out):
            raise ProtocolError("no_such_user", f"{to!r} is not online")
        ack = {"type": "ack", "ts": ts}
        if rid is not None:
            ack["id"] = rid
            session.remember_ack(rid, ack)
            if session.resumable:
                self.broker.remember_dm_ack(session.id, rid, ack)
        return ack

    def who(self, room: str) -> list[str]:
        return self.broker.members(room)

    def rooms(self) -> list[dict]:
        return self.broker.rooms()

    def history(self, room: str, since: int, limit: int | None) -> tuple[str, list[Outgoing]]:
        """The room's epoch and its retained msgs after ``since``, as the shared ``Outgoing``s.

        Limit defaults to 100 and is capped at ``history_size``: more is never retained. The
        messages are returned, not their dicts, so the reply is spliced from the encodings
        live delivery already made (the connection cuts it to ``max_history_bytes``).
        """
        limit = min(DEFAULT_HISTORY_LIMIT if limit is None else limit, max(1, self.history_size))
        outs = self.broker.history(room, since, limit)
        return self.broker.room_seq(room).epoch, outs

    # ------------------------------------------------------------ from the broker

    def deliver_room(self, room: str, out: Outgoing, exclude: str | None) -> None:
        """Fan out to this node's live members, never waiting on any of them.

        A msg goes into the room's feed for this turn (outbox.py): the first msg of a turn
        makes every member follow the feed, later ones are one append. Presence, which
        skips its subject, goes to each member directly.
        """
        members = self.local_members.get(room)
        if not members:
            return
        if exclude is None:
            feed = self.feeds.get(room)
            if feed is None:
                feed = RoomFeed()
                for session in members.values():
                    if session.peer is not None:
                        session.peer.follow(feed)
                        feed.followers += 1
                if not feed.followers:
                    return
                self.feeds[room] = feed
                self.turns.request()
            feed.outs.append(out)
            count = feed.followers
        else:
            count = 0
            for key, session in members.items():
                if session.peer is not None and key != exclude:
                    session.peer.deliver(out)
                    count += 1
        self.deliveries += count
        metrics.deliveries.inc(count)

    def _follow(self, peer: Peer, room: str) -> None:
        """A member joined or came back mid-turn: it gets the rest of this turn's msgs."""
        feed = self.feeds.get(room)
        if feed is not None:
            peer.follow(feed)
            feed.followers += 1

    def _unfollow(self, peer: Peer, room: str) -> None:
        feed = self.feeds.get(room)
        if feed is not None:
            peer.unfollow(feed)
            feed.followers -= 1

    def deliver_dm(self, nick_key: str, out: Outgoing) -> bool:
        session = self.by_nick.get(nick_key)
        if session is None or session.peer is None:
            return False
        session.peer.deliver(out)
        self.deliveries += 1
        metrics.deliveries.inc()
        return True

    @property
    def awaiting_resume(self) -> int:
        return len(self.detached)
