"""Go's channel, ``select`` and ``context`` on gevent, for the three things gevent lacks.

gevent has queues, events, locks and pools, which cover most of Go's toolbox (see
docs/go-migration.md). What it does not have:

* a channel that can be **closed**, so that ``for v in ch`` ends like Go's ``for range``
  and a receiver can tell "closed" from "a value" (``v, ok := <-ch``): a sentinel value
  in a ``gevent.queue`` is a convention every reader must know (recent gevent releases
  add Python 3.13's ``Queue.shutdown()``, still without ``v, ok`` or select);
* ``select`` over several channels, with ``default`` and a timeout: with queues a greenlet
  can only wait on one at a time;
* a ``context.Context``: a tree of cancellations with deadlines, whose ``done()`` can be
  waited on or selected together with other channels.

Semantics are Go's, including its panics, which become :class:`ChanClosedError` (send
on a closed channel, closing twice) and :class:`ValueError` (a negative capacity). ``None``
stands for Go's nil channel in a ``select`` case: never ready, a way to turn a case off.

Why no lock anywhere: every operation here runs without yielding until it blocks, and
gevent never preempts a greenlet, so a channel's state only changes between operations.
A blocked operation waits on one ``gevent.event.Event`` per waiting greenlet; the greenlet
that completes it hands the value over directly (Go's ``sudog``), so a waiter is never
woken for nothing and FIFO order holds among waiters of one channel.

A greenlet killed (``GreenletExit``, ``gevent.Timeout``) while blocked in ``recv`` or
``select`` just before it resumes may already have been handed a value: that value goes
back to the head of its channel, so a kill never loses a message.
"""
from __future__ import annotations

import random
import time
from collections import deque
from typing import Any, Generic, Iterator, NamedTuple, TypeVar

from gevent import get_hub
from gevent.event import Event

__all__ = [
    "CANCELED", "DEADLINE_EXCEEDED", "CancelFunc", "Chan", "ChanClosedError", "Context", "Recv", "Selected", "Send",
    "Ticker", "after", "background", "select", "with_cancel", "with_deadline", "with_timeout",
]

T = TypeVar("T")

CANCELED = "canceled"  # Go: context.Canceled
DEADLINE_EXCEEDED = "deadline exceeded"  # Go: context.DeadlineExceeded


class ChanClosedError(RuntimeError):
    """Go's panics "send on closed channel" and "close of closed channel"."""


# ------------------------------------------------------------------ waiting


class _Waiter:
    """One blocked greenlet (a recv, a send, or a whole select); the first case to fire wins."""

    __slots__ = ("event", "index", "value", "ok", "closed")

    def __init__(self) -> None:
        self.event = Event()
        self.index: int | None = None  # the case that fired; None while waiting
        self.value: Any = None
        self.ok = False
        self.closed = False  # a send case fired because its channel was closed

    def fire(self, index: int, value: Any = None, ok: bool = True, closed: bool = False) -> None:
        self.index, self.value, self.ok, self.closed = index, value, ok, closed
        self.event.set()


class _Entry:
    """A waiter's place in one channel's queue (a select has one per case)."""

    __slots__ = ("waiter", "index", "value")

    def __init__(self, waiter: _Waiter, index: int, value: Any = None) -> None:
        self.waiter = waiter
        self.index = index
        self.value = value


def _pop_live(queue: dict[_Entry, None]) -> _Entry | None:
    """The first entry whose waiter no other case has fired yet (stale ones are dropped)."""
    while queue:
        entry = next(iter(queue))
        del queue[entry]
        if entry.waiter.index is None:
            return entry
    return None


# ------------------------------------------------------------------ channels


class Chan(Generic[T]):
    """Go's ``make(chan T, capacity)``: unbuffered (0) by default.

    ``send`` blocks until a receiver takes the value (unbuffered) or there is room;
    ``recv`` returns ``(value, True)``, or ``(None, False)`` once the channel is closed and
    drained; iterating receives until then (``for v := range ch``).
    """

    __slots__ = ("capacity", "_buf", "_recvq", "_sendq", "_closed", "__weakref__")

    def __init__(self, capacity: int = 0) -> None:
        if capacity < 0:
            raise ValueError("makechan: size out of range")
        self.capacity = capacity
        self._buf: deque[T] = deque()
        # dicts used as ordered sets: FIFO, and O(1) removal when a select gives up a case
        self._recvq: dict[_Entry, None] = {}
        self._sendq: dict[_Entry, None] = {}
        self._closed = False

    def __len__(self) -> int:
        """Values buffered now (Go's ``len(ch)``)."""
        return len(self._buf)

    def __bool__(self) -> bool:
        return True  # a channel is a channel, however empty: ``if ch:`` must not mean ``len(ch)``

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Chan {len(self._buf)}/{self.capacity}{state}>"

    # The non-blocking halves: each completes the operation and returns True (or the
    # received pair), or changes nothing and returns False (or None).

    def _try_send(self, value: T) -> bool:
        if self._closed:
            raise ChanClosedError("send on closed channel")
        entry = _pop_live(self._recvq)
        if entry is not None:
            entry.waiter.fire(entry.index, value, True)
            return True
        if len(self._buf) < self.capacity:
            self._buf.append(value)
            return True
        return False

    def _try_recv(self) -> tuple[T | None, bool] | None:
        if self._buf:
            value = self._buf.popleft()
            entry = _pop_live(self._sendq)  # room now: the first blocked sender moves in
            if entry is not None:
                self._buf.append(entry.value)
                entry.waiter.fire(entry.index)
            return value, True
        entry = _pop_live(self._sendq)  # unbuffered: take straight from a blocked sender
        if entry is not None:
            entry.waiter.fire(entry.index)
            return entry.value, True
        if self._closed:
            return None, False
        return None

    def _give_back(self, value: T) -> None:
        """A value handed to a greenlet that was killed before it resumed: not lost."""
        entry = _pop_live(self._recvq)
        if entry is not None:
            entry.waiter.fire(entry.index, value, True)
        else:
            self._buf.appendleft(value)  # may exceed capacity by one, briefly

    # The Go operations.

    def send(self, value: T) -> None:
        """``ch <- value``; raises ChanClosedError if the channel is (or gets) closed."""
        if not self._try_send(value):
            _block((Send(self, value),), None)

    def recv(self) -> tuple[T | None, bool]:
        """``v, ok := <-ch``: ``(value, True)``, or ``(None, False)`` once closed and drained."""
        got = self._try_recv()
        if got is not None:
            return got
        _, value, ok = _block((Recv(self),), None)
        return value, ok

    def close(self) -> None:
        """``close(ch)``: receivers drain the buffer, then get ``(None, False)``; senders raise."""
        if self._closed:
            raise ChanClosedError("close of closed channel")
        self._closed = True
        while (entry := _pop_live(self._recvq)) is not None:
            entry.waiter.fire(entry.index, None, False)
        while (entry := _pop_live(self._sendq)) is not None:
            entry.waiter.fire(entry.index, closed=True)

    def __iter__(self) -> Iterator[T]:
        """``for v := range ch``: every value until the channel is closed and drained."""
        while True:
            value, ok = self.recv()
            if not ok:
                return
            yield value  # type: ignore[misc]  # ok: a real value, not the None of a closed channel


# ------------------------------------------------------------------ select


class Recv(NamedTuple):
    """A ``case v, ok := <-chan:``; ``chan`` None never fires (Go's nil channel)."""

    chan: Chan | None


class Send(NamedTuple):
    """A ``case chan <- value:``; ``chan`` None never fires."""

    chan: Chan | None
    value: Any


class Selected(NamedTuple):
    """Which case ran: its position among the cases (None: default or timeout), and for a
    ``Recv`` what ``v, ok := <-ch`` gave."""

    index: int | None
    value: Any = None
    ok: bool = False


def select(*cases: Recv | Send, default: bool = False, timeout: float | None = None) -> Selected:
    """Go's ``select``: run one ready case, chosen at random among the ready ones.

    With ``default=True`` it never blocks (Go's ``default:``); with ``timeout`` it gives up
    after that many seconds (Go's ``case <-time.After(d):``, without a timer channel).
    Either way ``index`` is then None. No cases and no timeout blocks forever, like
    ``select {}``. A chosen ``Send`` on a closed channel raises ChanClosedError.
    """
    if default and timeout is not None:
        raise ValueError("select takes default or timeout, not both")
    n = len(cases)
    # Go polls the cases in a random order: fairness among ready ones.
    for i in random.sample(range(n), n) if n > 1 else range(n):
        case = cases[i]
        if case.chan is None:
            continue
        if type(case) is Send:
            if case.chan._try_send(case.value):
                return Selected(i, None, True)
        else:
            got = case.chan._try_recv()
            if got is not None:
                return Selected(i, *got)
    if default:
        return Selected(None)
    return Selected(*_block(cases, timeout))


def _block(cases: tuple[Recv | Send, ...], timeout: float | None) -> tuple[int | None, Any, bool]:
    """Wait in every case's channel queue at once until one case fires (or the timeout)."""
    waiter = _Waiter()
    queued: list[tuple[dict[_Entry, None], _Entry]] = []
    for i, case in enumerate(cases):
        if case.chan is None:
            continue
        if type(case) is Send:
            queue = case.chan._sendq
            entry = _Entry(waiter, i, case.value)
        else:
            queue = case.chan._recvq
            entry = _Entry(waiter, i)
        queue[entry] = None
        queued.append((queue, entry))
    try:
        waiter.event.wait(timeout)
    except BaseException:
        if _withdraw(waiter, queued) and waiter.ok and type(cases[waiter.index]) is Recv:
            cases[waiter.index].chan._give_back(waiter.value)
        raise
    if not _withdraw(waiter, queued):
        return None, None, False  # timed out
    if waiter.closed:
        raise ChanClosedError("send on closed channel")
    return waiter.index, waiter.value, waiter.ok


def _withdraw(waiter: _Waiter, queued: list[tuple[dict[_Entry, None], _Entry]]) -> bool:
    """Leave every channel queue, so a loop over select leaves no stale entries behind.

    Returns whether a case fired; if none did, none can any more.
    """
    for queue, entry in queued:
        queue.pop(entry, None)
    if waiter.index is None:
        waiter.index = -1  # timed out or killed: a stale entry elsewhere must not fire it
        return False
    return True


# ------------------------------------------------------------------ time


def after(seconds: float) -> Chan[float]:
    """Go's ``time.After``: a channel that receives ``time.monotonic()`` once, after ``seconds``.

    A loop timer, not a greenlet: nothing to kill if nobody ever receives.
    """
    chan: Chan[float] = Chan(1)
    timer = get_hub().loop.timer(max(0.0, seconds))

    def fire() -> None:
        timer.close()
        chan._try_send(time.monotonic())

    timer.start(fire)
    return chan


class Ticker:
    """Go's ``time.NewTicker``: ``c`` receives ``time.monotonic()`` every ``interval`` seconds.

    Like Go's, ``c`` holds one tick and a tick is dropped when the reader is behind, so a
    slow reader never sees a burst of stale ticks. ``stop()`` ends the ticks (it does not
    close ``c``, as in Go).
    """

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("non-positive interval for Ticker")
        self.interval = interval
        self.c: Chan[float] = Chan(1)
        self._timer = get_hub().loop.timer(interval, interval)
        self._timer.start(self._tick)

    def _tick(self) -> None:
        self.c._try_send(time.monotonic())  # False, the tick dropped, when the last one is unread

    def stop(self) -> None:
        self._timer.close()


# ------------------------------------------------------------------ context


class Context:
    """Go's ``context.Context`` without values: cancellation and deadlines, as a tree.

    ``done()`` is a channel closed when the context is canceled (receive from it, or put
    ``Recv(ctx.done())`` in a select); ``err()`` says why. Canceling a context cancels its
    children, never its parent. Make them with :func:`background`, :func:`with_cancel`,
    :func:`with_timeout` and :func:`with_deadline`.
    """

    __slots__ = ("_parent", "_done", "_err", "_deadline", "_children", "_timer")

    def __init__(self, parent: Context | None = None, deadline: float | None = None) -> None:
        self._parent = parent
        self._done: Chan[None] = Chan()
        self._err: str | None = None
        self._children: set[Context] = set()
        self._timer = None
        if parent is not None and parent._deadline is not None:
            deadline = parent._deadline if deadline is None else min(deadline, parent._deadline)
        self._deadline = deadline
        if parent is not None:
            if parent._err is not None:
                self._cancel(parent._err)
                return
            if parent._parent is not None:  # background() is never canceled: no need to register
                parent._children.add(self)
        if deadline is not None:
            delay = deadline - time.monotonic()
            if delay <= 0:
                self._cancel(DEADLINE_EXCEEDED)
            else:
                self._timer = get_hub().loop.timer(delay)
                self._timer.start(self._cancel, DEADLINE_EXCEEDED)

    def done(self) -> Chan[None]:
        """Closed once the context is canceled: ``ctx.done().recv()`` waits for it."""
        return self._done

    def err(self) -> str | None:
        """None while live; then ``CANCELED`` or ``DEADLINE_EXCEEDED``."""
        return self._err

    def deadline(self) -> float | None:
        """When it will be canceled by itself, as ``time.monotonic()`` time; None: never."""
        return self._deadline

    def _cancel(self, err: str) -> None:
        if self._err is not None:
            return
        self._err = err
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self._parent is not None:
            self._parent._children.discard(self)  # a canceled child is not kept alive by its parent
        self._done.close()
        children, self._children = self._children, set()
        for child in children:
            child._cancel(err)

    def __repr__(self) -> str:
        return f"<Context err={self._err!r} deadline={self._deadline!r}>"


_BACKGROUND = None


def background() -> Context:
    """Go's ``context.Background()``: the root, never canceled."""
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = Context()
    return _BACKGROUND


class CancelFunc:
    """Go's ``CancelFunc``: cancels its context (and children); calling it again does nothing."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def __call__(self) -> None:
        self._ctx._cancel(CANCELED)


def with_cancel(parent: Context) -> tuple[Context, CancelFunc]:
    """``ctx, cancel := context.WithCancel(parent)``."""
    ctx = Context(parent)
    return ctx, CancelFunc(ctx)


def with_deadline(parent: Context, deadline: float) -> tuple[Context, CancelFunc]:
    """``context.WithDeadline``; ``deadline`` is a ``time.monotonic()`` time. Call cancel when
    done, as in Go, so the timer does not outlive the work."""
    ctx = Context(parent, deadline)
    return ctx, CancelFunc(ctx)


def with_timeout(parent: Context, seconds: float) -> tuple[Context, CancelFunc]:
    """``context.WithTimeout(parent, d)``."""
    return with_deadline(parent, time.monotonic() + seconds)
