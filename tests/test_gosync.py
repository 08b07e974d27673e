"""gochat.gosync: Go's channels, select and context, held to Go's semantics.

Greenlets are synchronised by the channels themselves and by ``gevent.idle()`` (run every
other greenlet until none can go on: a yield, not a timing guess). Wall-clock waits appear
only in the tests of timeouts, tickers and deadlines, and are short and bounded.
"""
from __future__ import annotations

import random
import time

import gevent
import pytest

from gochat.gosync import (
    CANCELED,
    DEADLINE_EXCEEDED,
    Chan,
    ChanClosedError,
    Recv,
    Send,
    Ticker,
    after,
    background,
    select,
    with_cancel,
    with_deadline,
    with_timeout,
)

SHORT = 0.05  # seconds, for the timing tests only


def settle() -> None:
    """Let every runnable greenlet run until it blocks."""
    gevent.idle()


# ------------------------------------------------------------------ channels


def test_unbuffered_send_waits_for_a_receiver():
    ch: Chan[int] = Chan()
    sender = gevent.spawn(ch.send, 1)
    settle()
    assert not sender.ready(), "an unbuffered send completes only when a receiver takes the value"
    assert ch.recv() == (1, True)
    settle()
    assert sender.successful()


def test_unbuffered_recv_waits_for_a_sender():
    ch: Chan[str] = Chan()
    receiver = gevent.spawn(ch.recv)
    settle()
    assert not receiver.ready()
    ch.send("x")  # a receiver waits: returns at once
    assert receiver.get(timeout=1) == ("x", True)


def test_buffered_send_blocks_only_when_full_and_keeps_fifo():
    ch: Chan[int] = Chan(2)
    ch.send(1)
    ch.send(2)
    assert len(ch) == 2
    third = gevent.spawn(ch.send, 3)
    settle()
    assert not third.ready()
    assert ch.recv() == (1, True)  # room now: the blocked sender's value moves in behind 2
    settle()
    assert third.successful()
    assert [ch.recv(), ch.recv()] == [(2, True), (3, True)]
    assert len(ch) == 0


def test_blocked_receivers_are_served_in_arrival_order():
    ch: Chan[int] = Chan()
    got: list[tuple[str, int]] = []
    receivers = [gevent.spawn(lambda name=name: got.append((name, ch.recv()[0]))) for name in "abc"]
    settle()
    for value in (1, 2, 3):
        ch.send(value)
    gevent.joinall(receivers, timeout=1, raise_error=True)
    assert got == [("a", 1), ("b", 2), ("c", 3)]


def test_blocked_senders_are_served_in_arrival_order():
    ch: Chan[int] = Chan(1)
    ch.send(0)
    senders = [gevent.spawn(ch.send, value) for value in (1, 2, 3)]
    settle()
    assert [ch.recv()[0] for _ in range(4)] == [0, 1, 2, 3]
    gevent.joinall(senders, timeout=1, raise_error=True)


def test_close_drains_the_buffer_then_reports_closed():
    ch: Chan[int] = Chan(3)
    ch.send(1)
    ch.send(2)
    ch.close()
    assert ch.recv() == (1, True)
    assert ch.recv() == (2, True)
    assert ch.recv() == (None, False)
    assert ch.recv() == (None, False), "a closed channel stays readable: zero value, ok false"


def test_close_wakes_every_blocked_receiver():
    ch: Chan[int] = Chan()
    receivers = [gevent.spawn(ch.recv) for _ in range(5)]
    settle()
    ch.close()
    assert [r.get(timeout=1) for r in receivers] == [(None, False)] * 5


def test_close_makes_blocked_senders_raise():
    ch: Chan[int] = Chan()
    sender = gevent.spawn(ch.send, 1)
    settle()
    ch.close()
    with pytest.raises(ChanClosedError, match="send on closed channel"):
        sender.get(timeout=1)


def test_send_on_closed_and_double_close_raise_like_go_panics():
    ch: Chan[int] = Chan(1)
    ch.close()
    with pytest.raises(ChanClosedError, match="send on closed channel"):
        ch.send(1)
    with pytest.raises(ChanClosedError, match="close of closed channel"):
        ch.close()


def test_len_counts_the_buffer_but_an_empty_channel_is_still_truthy():
    ch: Chan[int] = Chan(2)
    assert len(ch) == 0 and ch
    ch.send(1)
    assert len(ch) == 1


def test_negative_capacity_is_refused():
    with pytest.raises(ValueError):
        Chan(-1)


def test_for_range_ends_at_close_after_every_value():
    ch: Chan[int] = Chan(4)

    def produce() -> None:
        for i in range(100):
            ch.send(i)
        ch.close()

    producer = gevent.spawn(produce)
    assert list(ch) == list(range(100))
    producer.get(timeout=1)


def test_range_over_unbuffered_channel_with_several_producers():
    ch: Chan[int] = Chan()
    done: Chan[None] = Chan()

    def produce(base: int) -> None:
        for i in range(10):
            ch.send(base + i)
        done.send(None)

    def close_when_all_done() -> None:  # the WaitGroup-then-close idiom
        for _ in range(3):
            done.recv()
        ch.close()

    greenlets = [gevent.spawn(produce, base) for base in (0, 100, 200)] + [gevent.spawn(close_when_all_done)]
    assert sorted(ch) == [b + i for b in (0, 100, 200) for i in range(10)]
    gevent.joinall(greenlets, timeout=1, raise_error=True)


def test_killed_receiver_gives_its_value_back():
    """A value handed to a greenlet killed before it resumed goes back to the channel."""
    ch: Chan[str] = Chan()
    victim = gevent.spawn(ch.recv)
    settle()
    victim.kill(block=False)  # the kill is delivered after this greenlet yields ...
    ch.send("precious")  # ... and the value is handed over before that
    settle()
    assert victim.dead
    assert ch.recv() == ("precious", True)
    assert not ch._recvq and not ch._sendq


def test_killed_waiters_leave_no_trace():
    ch: Chan[int] = Chan()
    waiters = [gevent.spawn(ch.recv) for _ in range(3)] + [gevent.spawn(ch.send, 9)]
    settle()  # the sender met the first receiver; two receivers still wait
    gevent.killall(waiters, timeout=1)
    assert not ch._recvq and not ch._sendq
    assert select(Send(ch, 1), default=True).index is None, "no receiver is left to take it"


# ------------------------------------------------------------------ select


def test_select_takes_a_ready_case_at_once():
    a: Chan[int] = Chan(1)
    b: Chan[int] = Chan(1)
    b.send(7)
    assert select(Recv(a), Recv(b)) == (1, 7, True)


def test_select_default_when_nothing_is_ready():
    a: Chan[int] = Chan()
    chosen = select(Recv(a), Send(a, 1), default=True)
    assert chosen.index is None
    assert not a._recvq and not a._sendq, "a default select never queues"


def test_select_blocks_until_one_channel_is_ready_and_leaves_the_others():
    a: Chan[int] = Chan()
    b: Chan[int] = Chan()
    waiting = gevent.spawn(select, Recv(a), Recv(b))
    settle()
    assert len(a._recvq) == len(b._recvq) == 1
    b.send(5)
    assert waiting.get(timeout=1) == (1, 5, True)
    assert not a._recvq, "the case not taken is withdrawn"
    assert select(Send(a, 1), default=True).index is None


def test_select_fires_exactly_one_case():
    a: Chan[int] = Chan()
    b: Chan[int] = Chan()
    waiting = gevent.spawn(select, Recv(a), Send(b, "out"))
    settle()
    assert b.recv() == ("out", True)  # takes the send case
    assert waiting.get(timeout=1) == (1, None, True)
    assert select(Send(a, 1), default=True).index is None, "the receive case is gone"


def test_select_send_case():
    ch: Chan[int] = Chan()
    receiver = gevent.spawn(ch.recv)
    settle()
    assert select(Send(ch, 3)) == (0, None, True)
    assert receiver.get(timeout=1) == (3, True)


def test_select_recv_case_on_closed_channel_reports_closed():
    a: Chan[int] = Chan()
    closed: Chan[int] = Chan()
    closed.close()
    assert select(Recv(a), Recv(closed)) == (1, None, False)


def test_select_send_case_on_closed_channel_raises():
    closed: Chan[int] = Chan()
    closed.close()
    with pytest.raises(ChanClosedError):
        select(Send(closed, 1))


def test_select_blocked_send_raises_when_its_channel_closes():
    ch: Chan[int] = Chan()
    other: Chan[int] = Chan()
    waiting = gevent.spawn(select, Recv(other), Send(ch, 1))
    settle()
    ch.close()
    with pytest.raises(ChanClosedError):
        waiting.get(timeout=1)
    assert not other._recvq


def test_nil_channel_case_never_fires():
    ready: Chan[int] = Chan(1)
    ready.send(1)
    assert select(Recv(None), Send(None, 1), default=True).index is None
    assert select(Recv(None), Recv(ready)) == (1, 1, True)


def test_select_is_fair_among_ready_cases():
    random.seed(1)
    a: Chan[str] = Chan(1)
    b: Chan[str] = Chan(1)
    counts = {0: 0, 1: 0}
    for _ in range(2000):
        for ch, name in ((a, "a"), (b, "b")):
            if not len(ch):
                ch.send(name)
        counts[select(Recv(a), Recv(b)).index] += 1
    assert min(counts.values()) > 800, counts  # Go picks uniformly at random; first-listed would give 2000/0


def test_select_in_a_loop_leaves_no_stale_waiters():
    """A worker selecting on (jobs, quit) a thousand times must not pile entries on quit."""
    jobs: Chan[int] = Chan()
    quit_: Chan[None] = Chan()
    seen: list[int] = []

    def worker() -> None:
        while True:
            i, value, _ = select(Recv(jobs), Recv(quit_))
            if i == 1:
                return
            seen.append(value)

    g = gevent.spawn(worker)
    for i in range(1000):
        jobs.send(i)
    assert len(quit_._recvq) <= 1
    quit_.close()
    g.get(timeout=1)
    assert seen == list(range(1000))
    assert not quit_._recvq and not jobs._recvq


def test_select_rejects_default_with_timeout():
    with pytest.raises(ValueError):
        select(Recv(Chan()), default=True, timeout=1)


def test_select_timeout():
    ch: Chan[int] = Chan()
    started = time.monotonic()
    assert select(Recv(ch), timeout=SHORT).index is None
    assert SHORT * 0.8 <= time.monotonic() - started < 1.0
    assert not ch._recvq


def test_select_with_timeout_still_takes_a_value_that_arrives():
    ch: Chan[int] = Chan()
    gevent.spawn(ch.send, 4)
    assert select(Recv(ch), timeout=5) == (0, 4, True)


def test_select_interrupted_by_gevent_timeout_gives_value_back():
    ch: Chan[int] = Chan()
    other: Chan[int] = Chan()

    def waiter() -> None:
        with gevent.Timeout(5):
            select(Recv(other), Recv(ch))

    g = gevent.spawn(waiter)
    settle()
    g.kill(block=False)
    ch.send(8)
    settle()
    assert g.dead
    assert ch.recv() == (8, True)
    assert not other._recvq


# ------------------------------------------------------------------ time


def test_after_fires_once():
    ch: Chan[int] = Chan()
    started = time.monotonic()
    chosen = select(Recv(ch), Recv(after(SHORT)))
    assert chosen.index == 1 and isinstance(chosen.value, float)
    assert SHORT * 0.8 <= time.monotonic() - started < 1.0


def test_ticker_ticks_drops_when_behind_and_stops():
    ticker = Ticker(SHORT / 5)
    try:
        ticks = [ticker.c.recv()[0] for _ in range(3)]
        assert ticks == sorted(ticks)
        gevent.sleep(SHORT)  # five intervals unread: one tick kept, the others dropped
        assert len(ticker.c) == 1
    finally:
        ticker.stop()
    ticker.c.recv()  # the kept one
    assert select(Recv(ticker.c), timeout=SHORT).index is None, "no tick after stop"


def test_ticker_rejects_non_positive_interval():
    with pytest.raises(ValueError):
        Ticker(0)


# ------------------------------------------------------------------ context


def test_background_is_never_done():
    ctx = background()
    assert ctx is background()
    assert ctx.err() is None and ctx.deadline() is None
    assert select(Recv(ctx.done()), default=True).index is None


def test_cancel_closes_done_and_sets_err_once():
    ctx, cancel = with_cancel(background())
    waiters = [gevent.spawn(ctx.done().recv) for _ in range(3)]
    settle()
    assert ctx.err() is None
    cancel()
    cancel()  # a second call does nothing, as in Go
    assert ctx.err() == CANCELED
    assert [w.get(timeout=1) for w in waiters] == [(None, False)] * 3


def test_cancel_propagates_down_never_up():
    root, cancel_root = with_cancel(background())
    child, cancel_child = with_cancel(root)
    grandchild, _ = with_cancel(child)
    sibling, _ = with_cancel(root)
    cancel_child()
    assert (child.err(), grandchild.err()) == (CANCELED, CANCELED)
    assert root.err() is None and sibling.err() is None
    assert child not in root._children, "a canceled child is released by its parent"
    cancel_root()
    assert sibling.err() == CANCELED


def test_background_keeps_no_children():
    for _ in range(100):
        with_cancel(background())
    assert not background()._children


def test_child_of_canceled_parent_starts_canceled():
    parent, cancel = with_cancel(background())
    cancel()
    child, _ = with_timeout(parent, 60)
    assert child.err() == CANCELED
    assert child.done().recv() == (None, False)


def test_timeout_cancels_with_deadline_exceeded():
    ctx, cancel = with_timeout(background(), SHORT)
    assert abs(ctx.deadline() - (time.monotonic() + SHORT)) < 0.5
    started = time.monotonic()
    assert ctx.done().recv() == (None, False)
    assert SHORT * 0.8 <= time.monotonic() - started < 1.0
    assert ctx.err() == DEADLINE_EXCEEDED
    cancel()
    assert ctx.err() == DEADLINE_EXCEEDED, "the first reason stays"


def test_cancel_before_deadline_wins():
    ctx, cancel = with_timeout(background(), SHORT)
    cancel()
    assert ctx.err() == CANCELED
    assert ctx._timer is None, "the timer is released at cancel"


def test_past_deadline_is_done_at_once():
    ctx, _ = with_deadline(background(), time.monotonic() - 1)
    assert ctx.err() == DEADLINE_EXCEEDED


def test_child_deadline_is_capped_by_parent_and_inherits_its_expiry():
    parent, _ = with_timeout(background(), SHORT)
    child, _ = with_timeout(parent, 60)
    plain, _ = with_cancel(parent)
    assert child.deadline() == parent.deadline() == plain.deadline()
    assert plain.done().recv() == (None, False)
    assert (parent.err(), child.err(), plain.err()) == (DEADLINE_EXCEEDED,) * 3


def test_done_in_select_stops_a_worker():
    """The Go shape: for { select { case j := <-jobs: ...; case <-ctx.Done(): return ctx.Err() } }."""
    ctx, cancel = with_cancel(background())
    jobs: Chan[int] = Chan()
    handled: list[int] = []

    def worker() -> str | None:
        while True:
            i, job, _ = select(Recv(jobs), Recv(ctx.done()))
            if i == 1:
                return ctx.err()
            handled.append(job)

    g = gevent.spawn(worker)
    jobs.send(1)
    jobs.send(2)
    cancel()
    assert g.get(timeout=1) == CANCELED
    assert handled == [1, 2]
