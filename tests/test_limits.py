"""The per-connection token bucket (PROTOCOL.md section 6, rate_limited) and the sync.Pool twin.

Time is passed in explicitly: no sleeps, no clock.
"""
import pytest

from gochat.limits import TokenBucket
from gochat.syncpool import Pool


def bucket(rate=2.0, burst=3, max_strikes=3):
    return TokenBucket(rate, burst, max_strikes, clock=100.0)


def take_many(b, count, now):
    return [b.take(now) for _ in range(count)]


# ---------------------------------------------------------------- burst and refill


def test_a_new_bucket_allows_a_full_burst_at_once():
    b = bucket(burst=3)
    assert take_many(b, 3, 100.0) == [True, True, True]
    assert b.take(100.0) is False


def test_refill_is_rate_tokens_per_second():
    b = bucket(rate=2.0, burst=3)
    take_many(b, 3, 100.0)
    assert b.take(100.4) is False  # 0.8 of a token
    assert b.take(100.5) is True  # 1.0: the 0.8 was kept, not lost on the refused take
    assert b.take(100.5) is False
    assert take_many(b, 2, 101.5) == [True, True]  # one second later: two more
    assert b.take(101.5) is False


def test_refill_never_exceeds_the_burst():
    b = bucket(rate=2.0, burst=3)
    take_many(b, 3, 100.0)
    assert take_many(b, 4, 1000.0) == [True, True, True, False]


def test_sustained_rate_is_honoured():
    """At exactly ``rate`` requests per second a drained bucket never refuses."""
    b = bucket(rate=8.0, burst=1)  # 1/8 s steps are exact in binary floating point
    assert all(b.take(100.0 + i / 8) for i in range(1000))
    assert b.take(100.0 + 999 / 8) is False


def test_fractional_rate():
    b = TokenBucket(0.5, 1, 5, clock=0.0)
    assert b.take(0.0) is True
    assert b.take(1.0) is False
    assert b.take(2.0) is True


def test_the_clock_starts_at_construction():
    b = TokenBucket(1.0, 2, 5, clock=50.0)
    take_many(b, 2, 50.0)
    assert b.take(50.5) is False
    assert b.take(51.0) is True


# ---------------------------------------------------------------- strikes


def test_each_refused_request_is_a_strike():
    b = bucket(burst=1, max_strikes=3)
    b.take(100.0)
    assert b.strikes == 0
    b.take(100.0)
    b.take(100.0)
    assert b.strikes == 2
    assert not b.struck_out


def test_struck_out_after_max_strikes_in_a_row():
    b = bucket(burst=1, max_strikes=3)
    b.take(100.0)
    take_many(b, 3, 100.0)
    assert b.strikes == 3
    assert b.struck_out


def test_an_accepted_request_resets_the_strikes():
    b = bucket(rate=1.0, burst=1, max_strikes=3)
    b.take(100.0)
    take_many(b, 2, 100.0)
    assert b.strikes == 2
    assert b.take(101.0) is True
    assert b.strikes == 0
    take_many(b, 2, 101.0)
    assert not b.struck_out  # 2 + 2 refusals, but never 3 in a row


@pytest.mark.parametrize("max_strikes", [1, 5, 50])
def test_struck_out_exactly_at_the_limit(max_strikes):
    b = TokenBucket(1.0, 1, max_strikes, clock=0.0)
    b.take(0.0)
    for strike in range(1, max_strikes + 1):
        assert not b.struck_out
        assert b.take(0.0) is False
        assert b.strikes == strike
    assert b.struck_out


def test_defaults_of_section_9():
    """rate 20, burst 40: a client may send 40 at once, then 20 a second."""
    b = TokenBucket(20.0, 40, 50, clock=0.0)
    assert take_many(b, 41, 0.0) == [True] * 40 + [False]
    assert take_many(b, 20, 1.0).count(True) == 20


# ---------------------------------------------------------------- Pool (Go's sync.Pool)


def test_get_from_an_empty_pool_calls_new():
    pool = Pool(bytearray)
    first, second = pool.get(), pool.get()
    assert first is not second
    assert pool.created == 2
    assert pool.idle == 0


def test_put_then_get_reuses_the_same_object():
    pool = Pool(bytearray)
    buf = pool.get()
    pool.put(buf)
    assert pool.idle == 1
    assert pool.get() is buf
    assert pool.created == 1
    assert pool.idle == 0


def test_last_put_is_first_out():
    """LIFO: the most recently used buffer is the one most likely still in a CPU cache."""
    pool = Pool(bytearray)
    a, b = pool.get(), pool.get()
    pool.put(a)
    pool.put(b)
    assert pool.get() is b
    assert pool.get() is a


def test_max_idle_bounds_what_the_pool_keeps():
    pool = Pool(bytearray, max_idle=2)
    items = [pool.get() for _ in range(5)]
    for item in items:
        pool.put(item)
    assert pool.idle == 2
    kept = {id(pool.get()), id(pool.get())}
    assert kept == {id(items[0]), id(items[1])}
    assert pool.get() is not None
    assert pool.created == 6  # the third get after draining needed a new one


def test_max_idle_zero_keeps_nothing():
    pool = Pool(list, max_idle=0)
    pool.put(pool.get())
    assert pool.idle == 0
    pool.get()
    assert pool.created == 2


def test_new_is_any_factory():
    pool = Pool(lambda: bytearray(4096))
    assert len(pool.get()) == 4096
