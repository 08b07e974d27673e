"""Output waiting to be written: one connection's outbox, and a room's feed for one loop turn.

Why not the Go way (each message copied into each member's channel)? In Python the cost of
a broadcast is the per-member work, so gochat makes it per member *per event-loop turn*
instead of per message: all msgs a room gets in one turn go into one :class:`RoomFeed`;
every member's :class:`Outbox` holds a :class:`Cursor` into it, not a copy; when the turn
ends, the feed's messages are joined once per codec and the same bytes object is written
to every member. A thousand members and forty messages in a turn cost one ``join`` and a
thousand ``send`` calls, not forty thousand appends.

Order rule: an outbox holds byte strings and cursors in the order events happened to its
connection. Adding bytes (a reply, a presence, a DM) closes every open cursor at its feed's
current length and reopens it after the bytes, so a member sees room messages, presence
and replies in exactly the order the hub produced them.
"""
from __future__ import annotations

from gochat.protocol import Codec, Outgoing


class RoomFeed:
    """A room's msgs of the current turn: appended by the hub, sealed when the turn's output is written."""

    __slots__ = ("outs", "followers", "_encoded")

    def __init__(self) -> None:
        self.outs: list[Outgoing] = []
        self.followers = 0  # connections reading this feed: the deliveries of each msg
        self._encoded: dict[tuple[Codec, int, int], bytes] = {}

    def encoded(self, codec: Codec, start: int, end: int) -> bytes:
        """``outs[start:end]`` encoded and joined: computed once, shared by every member asking for it."""
        key = (codec, start, end)
        data = self._encoded.get(key)
        if data is None:
            data = self._encoded[key] = b"".join([out.encoded(codec) for out in self.outs[start:end]])
        return data


class Cursor:
    """A member's share of a feed: ``feed.outs[start:end]``; ``end`` None follows the feed as it grows."""

    __slots__ = ("feed", "start", "end")

    def __init__(self, feed: RoomFeed, start: int) -> None:
        self.feed = feed
        self.start = start
        self.end: int | None = None

    def resolve(self, codec: Codec) -> bytes:
        end = len(self.feed.outs) if self.end is None else self.end
        return self.feed.encoded(codec, self.start, end) if end > self.start else b""


class Outbox:
    """One connection's unsent output, in order; owned by that connection.

    ``size`` counts bytes known so far; what open cursors will add is counted when
    :meth:`materialize` turns them into bytes, once per turn.
    """

    __slots__ = ("codec", "items", "size", "_open")

    def __init__(self, codec: Codec | None) -> None:
        self.codec = codec
        self.items: list[bytes | Cursor] = []
        self.size = 0
        self._open: dict[RoomFeed, Cursor] = {}

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, data: bytes) -> None:
        if self._open:
            for feed, cursor in self._open.items():
                cursor.end = len(feed.outs)
            self.items.append(data)
            for feed in self._open:
                self._open[feed] = cursor = Cursor(feed, len(feed.outs))
                self.items.append(cursor)
        else:
            self.items.append(data)
        self.size += len(data)

    def follow(self, feed: RoomFeed) -> None:
        """Receive the feed's messages from its current end on."""
        if feed not in self._open:
            self._open[feed] = cursor = Cursor(feed, len(feed.outs))
            self.items.append(cursor)

    def unfollow(self, feed: RoomFeed) -> None:
        cursor = self._open.pop(feed, None)
        if cursor is not None:
            cursor.end = len(feed.outs)

    def materialize(self) -> None:
        """Resolve cursors into bytes: the feeds are sealed, so their contents are final."""
        self._open.clear()
        items = self.items
        for i, item in enumerate(items):
            if type(item) is Cursor:
                items[i] = data = item.resolve(self.codec)
                self.size += len(data)

    def take(self) -> bytes:
        """Everything pending as one byte string (the coalesced write); the outbox is then empty."""
        self.materialize()
        items = self.items
        data = items[0] if len(items) == 1 else b"".join(items)
        items.clear()
        self.size = 0
        return data

    def take_ready(self) -> bytes:
        """What can be written before the turn ends: everything ahead of the first open cursor.

        An open cursor's feed may still grow in this turn; resolving it now would lose the
        turn's later msgs for this connection. It stays, with what follows it, for the
        turn's flush (the feed is sealed by then).
        """
        items = self.items
        end = len(items)
        if self._open:
            end = next(i for i, item in enumerate(items) if type(item) is Cursor and item.end is None)
        chunks = []
        for item in items[:end]:
            if type(item) is Cursor:
                chunks.append(item.resolve(self.codec))
            else:
                chunks.append(item)
                self.size -= len(item)
        del items[:end]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def clear(self) -> None:
        self.items.clear()
        self._open.clear()
        self.size = 0
