"""The gochat wire protocol, sans-IO: bytes in, messages out, and back.

Nothing here touches a socket or gevent, so the server, the client library, the load tools
and the fuzzers share one implementation (the h11 model: ``receive_data`` stores bytes,
``next_event`` returns a message or ``NEED_DATA``, encoders return bytes to write).

Rules of the byte stream (PROTOCOL.md sections 1 and 7):

1. The codec is fixed by the first bytes: exactly ``GCF1`` -> frames; first non-blank byte
   ``{`` -> json lines; anything else -> text lines. Leading blanks are discarded while the
   codec is unknown, so a peer sending only blanks cannot grow the buffer.
2. A json or text line, or a frame payload, longer than ``max_frame_bytes`` is
   ``too_large`` the moment that is known, before the rest arrives.
3. A frame whose CRC does not match is consumed and reported as ``bad_checksum``; the
   stream stays in sync because the length prefix was valid.
4. Every decoding problem is a :class:`ProtocolError` carrying a PROTOCOL.md error code;
   nothing else escapes (the hypothesis fuzz tests hold this).
"""
from __future__ import annotations

import enum
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Union

import ujson

VERSION = 1
FRAME_MAGIC = b"GCF1"
FRAME_HEADER = struct.Struct(">II")
BLANKS = b" \t\r\n"
MAX_ID_CHARS = 64
NICK_RE = re.compile(r"[A-Za-z0-9_.\-]{1,32}\Z")
ROOM_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}\Z")
DEFAULT_HISTORY_LIMIT = 100


class Codec(str, enum.Enum):
    """How one connection's bytes are framed; fixed by its first bytes."""

    JSON = "json"
    FRAMES = "frames"
    TEXT = "text"


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    code: str
    closes: bool
    message: str


# The error table of PROTOCOL.md section 6: one row per code, whether it closes the
# connection, and the default human message.
ERRORS: dict[str, ErrorSpec] = {
    spec.code: spec
    for spec in (
        ErrorSpec("bad_json", False, "not valid UTF-8 JSON object"),
        ErrorSpec("bad_request", False, "malformed request"),
        ErrorSpec("unknown_type", False, "unknown message type"),
        ErrorSpec("bad_checksum", False, "frame CRC-32 mismatch"),
        ErrorSpec("hello_required", False, "the first message must be hello"),
        ErrorSpec("bad_nick", False, "nicks are 1-32 characters of A-Z a-z 0-9 _ . -"),
        ErrorSpec("nick_taken", False, "that nick is in use"),
        ErrorSpec("bad_session", False, "unknown or expired session"),
        ErrorSpec("unsupported_version", False, "this server speaks protocol version 1"),
        ErrorSpec("auth_failed", True, "authentication failed"),
        ErrorSpec("not_in_room", False, "you are not in that room"),
        ErrorSpec("no_such_user", False, "no such user online"),
        ErrorSpec("bad_room", False, "room names are 1-64 characters of A-Z a-z 0-9 _ . : -"),
        ErrorSpec("too_many_rooms", False, "too many rooms"),
        ErrorSpec("rate_limited", False, "too many requests, slow down"),
        ErrorSpec("too_large", True, "frame or line too large"),
        ErrorSpec("too_many_connections", True, "too many connections"),
        ErrorSpec("slow_consumer", True, "outbound buffer overflow: you are not reading"),
        ErrorSpec("idle_timeout", True, "nothing received for too long"),
        ErrorSpec("handshake_timeout", True, "no hello in time"),
        ErrorSpec("unavailable", False, "service temporarily unavailable, retry later"),
        ErrorSpec("shutting_down", False, "server is shutting down"),
    )
}


class ProtocolError(Exception):
    """A problem with what a peer sent, named by a PROTOCOL.md error code.

    ``request_id`` is the id to echo: set only once the id itself was found valid.
    """

    def __init__(self, code: str, message: str | None = None, request_id: Any = None) -> None:
        spec = ERRORS[code]
        self.code = code
        self.message = message or spec.message
        self.request_id = request_id
        super().__init__(f"{code}: {self.message}")

    @property
    def closes(self) -> bool:
        return ERRORS[self.code].closes

    def to_message(self) -> dict[str, Any]:
        return error_message(self.code, self.message, self.request_id)


def error_message(code: str, message: str | None = None, request_id: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "code": code, "message": message or ERRORS[code].message}
    if request_id is not None:
        out["id"] = request_id
    return out


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
Event = Union[dict, str, _NeedData]


def _parse_json(payload: bytes) -> dict:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad_json", f"not valid UTF-8 at byte {exc.start}") from None
    try:
        obj = ujson.loads(text)
    except (ValueError, OverflowError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"invalid JSON: {exc}"[:200]) from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", "a message must be a JSON object")
    return obj


class Decoder:
    """Turns one connection's inbound bytes into messages.

    ``next_event`` returns a dict (json, frames), a str line (text: the caller maps it with
    :func:`parse_text_line`), or ``NEED_DATA``. ``codec`` is None until rule 1 decides it.
    """

    __slots__ = ("max_frame_bytes", "codec", "_buf", "_pos", "_scan", "_blanks_seen")

    def __init__(self, max_frame_bytes: int, codec: Codec | None = None) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.codec = codec
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed data; compacted lazily so a burst is not O(n^2)
        self._scan = 0  # where the newline search resumes, so a slow line is not rescanned
        self._blanks_seen = False  # GCF1 counts only as the very first bytes, however they are chunked

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event:
        if self.codec is None and not self._detect():
            return NEED_DATA
        if self.codec is Codec.FRAMES:
            return self._next_frame()
        line = self._next_line()
        if line is None:
            if self._pos == len(self._buf):  # all consumed: an idle connection keeps no buffer
                self._buf.clear()
                self._pos = self._scan = 0
            return NEED_DATA
        if self.codec is Codec.JSON:
            return _parse_json(line)
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_request", "line is not valid UTF-8") from None

    def _detect(self) -> bool:
        buf, pos = self._buf, self._pos
        head = bytes(buf[pos : pos + 4])
        if not self._blanks_seen:
            if head == FRAME_MAGIC:
                self.codec = Codec.FRAMES
                self._pos = self._scan = pos + 4
                return True
            if FRAME_MAGIC.startswith(head):  # empty or a strict prefix: wait
                return False
        end = len(buf)
        while pos < end and buf[pos] in BLANKS:
            pos += 1
        self._blanks_seen = self._blanks_seen or pos > self._pos
        self._pos = self._scan = pos
        if pos == end:
            return False
        self.codec = Codec.JSON if buf[pos] == ord("{") else Codec.TEXT
        return True

    def _next_line(self) -> bytes | None:
        """The next non-blank line without its terminator, or None when none is complete."""
        buf, limit = self._buf, self.max_frame_bytes
        while True:
            nl = buf.find(b"\n", self._scan)
            if nl < 0:
                pending = len(buf) - self._pos
                if pending > limit and not (pending == limit + 1 and buf[-1] == 13):
                    raise ProtocolError("too_large", f"line longer than {limit} bytes")
                self._scan = len(buf)
                return None
            end = nl - 1 if nl > self._pos and buf[nl - 1] == 13 else nl
            line = bytes(buf[self._pos : end])
            self._pos = self._scan = nl + 1
            if len(line) > limit:
                raise ProtocolError("too_large", f"line longer than {limit} bytes")
            if line.strip(BLANKS):
                return line

    def _next_frame(self) -> Event:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < FRAME_HEADER.size:
            if pos == len(buf):
                buf.clear()
                self._pos = self._scan = 0
            return NEED_DATA
        length, crc = FRAME_HEADER.unpack_from(buf, pos)
        if length > self.max_frame_bytes:
            raise ProtocolError("too_large", f"frame of {length} bytes, limit {self.max_frame_bytes}")
        start = pos + FRAME_HEADER.size
        if len(buf) - start < length:
            return NEED_DATA
        payload = bytes(buf[start : start + length])
        self._pos = self._scan = start + length
        if zlib.crc32(payload) != crc:
            raise ProtocolError("bad_checksum")
        return _parse_json(payload)


# ---------------------------------------------------------------- encoding


def encode_json(message: dict) -> bytes:
    return ujson.dumps(message, ensure_ascii=False, escape_forward_slashes=False).encode("utf-8") + b"\n"


def encode_frame(message: dict) -> bytes:
    payload = ujson.dumps(message, ensure_ascii=False, escape_forward_slashes=False).encode("utf-8")
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def encode_frame_request(message: dict) -> bytes:
    """What a client sends first on a frames connection is the magic, then frames."""
    return FRAME_MAGIC + encode_frame(message)


_FLATTEN = str.maketrans({"\r": " ", "\n": " "})


def _one_line(text: str) -> str:
    return text.translate(_FLATTEN)


def render_text(message: dict) -> str | None:
    """The text-mode line (section 7) for a server message; None for what text users do not see."""
    kind = message.get("type")
    if kind == "msg":
        return f"[{message['room']}] {message['from']}: {_one_line(message['text'])}"
    if kind == "dm":
        return f"[dm] {message['from']}: {_one_line(message['text'])}"
    if kind == "presence":
        status = message["status"]
        if status == "join":
            return f"* {message['nick']} joined {message['room']}"
        if status == "leave":
            return f"* {message['nick']} left {message['room']}"
        return f"* {message['nick']} is offline"
    if kind == "error":
        return f"! {message['code']}: {_one_line(message.get('message', ''))}"
    if kind == "welcome":
        return f"* welcome {message['nick']}"
    if kind == "joined":
        return f"* joined {message['room']}, members: {' '.join(message['members'])}"
    if kind == "left":
        return f"* left {message['room']}"
    if kind == "who":
        return f"* members of {message['room']}: {' '.join(message['members'])}"
    if kind == "rooms":
        listing = " ".join(f"{r['room']}({r['members']})" for r in message["rooms"])
        return f"* rooms: {listing or '(none)'}"
    if kind == "history":
        return "\n".join(render_text(m) or "" for m in message["messages"]) or None
    if kind == "shutdown":
        seconds = math.ceil(message.get("reconnect_after", 0) / 1000)
        return f"* server shutting down, reconnect in {seconds} s"
    return None  # ack, pong, ping: machine chatter


def encode_text(message: dict) -> bytes:
    line = render_text(message)
    return b"" if line is None else (line + "\n").encode("utf-8")


ENCODERS = {Codec.JSON: encode_json, Codec.FRAMES: encode_frame, Codec.TEXT: encode_text}


def encode(message: dict, codec: Codec) -> bytes:
    return ENCODERS[codec](message)


class Outgoing:
    """A server message shared by many recipients: encoded at most once per codec.

    Treat it as immutable once built; the hub fans the same object out to every member and
    keeps it in history, so a broadcast to a thousand json clients costs one ``ujson.dumps``,
    and a ``history`` reply or a replay reuses those bytes instead of encoding again.
    """

    __slots__ = ("message", "_encoded")

    def __init__(self, message: dict) -> None:
        self.message = message
        self._encoded: dict[Codec, bytes] = {}

    def encoded(self, codec: Codec) -> bytes:
        data = self._encoded.get(codec)
        if data is None:
            data = self._encoded[codec] = ENCODERS[codec](self.message)
        return data

    def json_object(self) -> memoryview:
        """The message's JSON object alone, cut from an encoding already made when there is one.

        A json line is the object plus ``\n``, a frame is a header plus the object: either
        serves (a view, not a copy), so a room whose members all use frames is not encoded
        a second time for a json client's ``history``.
        """
        data = self._encoded.get(Codec.JSON)
        if data is not None:
            return memoryview(data)[:-1]
        data = self._encoded.get(Codec.FRAMES)
        if data is not None:
            return memoryview(data)[FRAME_HEADER.size:]
        return memoryview(self.encoded(Codec.JSON))[:-1]


def within_budget(outs: list[Outgoing], codec: Codec, budget: int) -> tuple[list[Outgoing], bool]:
    """The leading ``outs`` whose encodings in ``codec`` hold at most ``budget`` bytes, and
    whether any were left out (the reply's ``"more": true``, PROTOCOL.md section 3).

    The first message is always included, however large: a client paging with ``since``
    always progresses. Sizes are the cached encodings live delivery uses, so measuring
    costs no encoding either.
    """
    total = 0
    for count, out in enumerate(outs):
        total += len(out.encoded(codec))
        if total > budget and count:
            return outs[:count], True
    return outs, False


def encode_history(reply: dict, outs: list[Outgoing], codec: Codec) -> bytes:
    """``reply`` (a ``history`` without its messages) with ``"messages"`` spliced from ``outs``.

    The bytes equal ``encode({**reply, "messages": [out.message for out in outs]}, codec)``
    (``messages`` last), but each message is the JSON already made for live delivery: a
    reply costs one small ``ujson.dumps`` and a join, however big its messages are. Text
    mode shows a history as its messages' lines, which are the cached text encodings.
    """
    if codec is Codec.TEXT:
        return b"".join([out.encoded(codec) for out in outs])
    head = ujson.dumps(reply, ensure_ascii=False, escape_forward_slashes=False).encode("utf-8")
    body = b"".join([head[:-1], b',"messages":[', b",".join([out.json_object() for out in outs]), b"]}"])
    if codec is Codec.JSON:
        return body + b"\n"
    return FRAME_HEADER.pack(len(body), zlib.crc32(body)) + body


# ---------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Hello:
    id: Any
    nick: str | None
    token: str | None
    resume: str | None


@dataclass(frozen=True, slots=True)
class Join:
    id: Any
    room: str
    since: int | None


@dataclass(frozen=True, slots=True)
class Leave:
    id: Any
    room: str


@dataclass(frozen=True, slots=True)
class Msg:
    id: Any
    room: str
    text: str


@dataclass(frozen=True, slots=True)
class Dm:
    id: Any
    to: str
    text: str


@dataclass(frozen=True, slots=True)
class Who:
    id: Any
    room: str


@dataclass(frozen=True, slots=True)
class Rooms:
    id: Any


@dataclass(frozen=True, slots=True)
class History:
    id: Any
    room: str
    since: int
    limit: int | None


@dataclass(frozen=True, slots=True)
class Ping:
    id: Any
    ts: Any


@dataclass(frozen=True, slots=True)
class Pong:
    id: Any
    ts: Any


@dataclass(frozen=True, slots=True)
class Bye:
    id: Any


Request = Union[Hello, Join, Leave, Msg, Dm, Who, Rooms, History, Ping, Pong, Bye]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _utf8_safe(value: str) -> bool:
    """Lone surrogates decode from JSON escapes but cannot be sent back out."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _request_id(obj: dict) -> Any:
    rid = obj.get("id")
    if rid is None:
        return None
    if _is_int(rid) and -(2**63) <= rid < 2**64:
        return rid
    if isinstance(rid, str) and len(rid) <= MAX_ID_CHARS and _utf8_safe(rid):
        return rid
    raise ProtocolError("bad_request", "id must be a string of at most 64 characters or an integer")


class _Fields:
    """Typed access to one request's fields; every failure names the field."""

    __slots__ = ("obj", "rid")

    def __init__(self, obj: dict, rid: Any) -> None:
        self.obj, self.rid = obj, rid

    def fail(self, message: str, code: str = "bad_request") -> ProtocolError:
        return ProtocolError(code, message, self.rid)

    def room(self) -> str:
        room = self.obj.get("room")
        if room is None:
            raise self.fail("missing field: room")
        if not isinstance(room, str):
            raise self.fail("room must be a string")
        if not ROOM_RE.match(room):
            raise self.fail(f"bad room name {room[:80]!r}", "bad_room")
        return room

    def text(self, max_chars: int) -> str:
        text = self.obj.get("text")
        if not isinstance(text, str):
            raise self.fail("text must be a string")
        if len(text) > max_chars:
            raise self.fail(f"text longer than {max_chars} characters")
        if not _utf8_safe(text):
            raise self.fail("text is not valid Unicode")
        return text

    def optional_str(self, name: str) -> str | None:
        value = self.obj.get(name)
        if value is not None and not (isinstance(value, str) and _utf8_safe(value)):
            raise self.fail(f"{name} must be a string")
        return value

    def count(self, name: str, default: int | None, minimum: int) -> int | None:
        value = self.obj.get(name)
        if value is None:
            return default
        if not _is_int(value) or value < minimum:
            raise self.fail(f"{name} must be an integer >= {minimum}")
        return value

    def echo(self, name: str) -> Any:
        """A value echoed back verbatim (ping ts): anything the encoder can write again."""
        value = self.obj.get(name)
        if value is None or _is_int(value) or (isinstance(value, float) and math.isfinite(value)):
            return value
        if isinstance(value, str) and len(value) <= MAX_ID_CHARS and _utf8_safe(value):
            return value
        raise self.fail(f"{name} must be a number or a short string")


def _hello(f: _Fields) -> Hello:
    version = f.obj.get("v", VERSION)
    if not _is_int(version):
        raise f.fail("v must be an integer")
    if version != VERSION:
        raise f.fail(f"version {version} not supported; this server speaks {VERSION}", "unsupported_version")
    nick, token, resume = f.optional_str("nick"), f.optional_str("token"), f.optional_str("resume")
    if nick is None and token is None and resume is None:
        raise f.fail("hello needs nick, token or resume")
    if nick is not None and resume is None and token is None and not NICK_RE.match(nick):
        raise f.fail(f"bad nick {nick[:40]!r}", "bad_nick")
    return Hello(f.rid, nick, token, resume)


def _dm_target(f: _Fields) -> str:
    to = f.obj.get("to")
    if not isinstance(to, str):
        raise f.fail("to must be a nick")
    return to


_PARSERS = {
    "hello": _hello,
    "join": lambda f: Join(f.rid, f.room(), f.count("since", None, 0)),
    "leave": lambda f: Leave(f.rid, f.room()),
    "who": lambda f: Who(f.rid, f.room()),
    "rooms": lambda f: Rooms(f.rid),
    "history": lambda f: History(f.rid, f.room(), f.count("since", 0, 0), f.count("limit", None, 1)),
    "ping": lambda f: Ping(f.rid, f.echo("ts")),
    "pong": lambda f: Pong(f.rid, f.echo("ts")),
    "bye": lambda f: Bye(f.rid),
}


def parse_request(obj: dict, max_text_chars: int) -> Request:
    """Validate one decoded client message; raises ProtocolError with the id echoed when valid."""
    rid = _request_id(obj)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_request", "missing or non-string field: type", rid)
    f = _Fields(obj, rid)
    if kind == "msg":  # the hot path: checked first, without a table lookup
        return Msg(rid, f.room(), f.text(max_text_chars))
    if kind == "dm":
        return Dm(rid, _dm_target(f), f.text(max_text_chars))
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError("unknown_type", f"unknown type {kind[:40]!r}", rid)
    return parser(f)


# ---------------------------------------------------------------- text mode commands

TEXT_COMMANDS = ("/join", "/leave", "/who", "/rooms", "/msg", "/quit")


def parse_text_line(line: str, *, greeted: bool, jwt: bool = False) -> dict:
    """Map one text-mode line (section 7) to the request it stands for, as a json client would send it.

    A plain line becomes a ``msg`` without a room, and ``/who`` without a room names none:
    the connection fills in its most recently joined room.
    """
    line = line.strip()
    if not greeted:
        if jwt:
            command, _, token = line.partition(" ")
            if command != "/token":
                return {"type": "hello", "token": ""}
            return {"type": "hello", "token": token.strip()}
        return {"type": "hello", "nick": line}
    if not line.startswith("/"):
        return {"type": "msg", "room": None, "text": line}
    command, _, rest = line.partition(" ")
    rest = rest.strip()
    if command == "/join":
        return {"type": "join", "room": rest}
    if command == "/leave":
        return {"type": "leave", "room": rest}
    if command == "/who":
        return {"type": "who", "room": rest or None}
    if command == "/rooms":
        return {"type": "rooms"}
    if command == "/msg":
        to, _, text = rest.partition(" ")
        return {"type": "dm", "to": to, "text": text}
    if command == "/quit":
        return {"type": "bye"}
    raise ProtocolError("bad_request", f"unknown command {command[:40]}")
