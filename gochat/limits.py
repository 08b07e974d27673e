"""Request limits: the token bucket and its strike counter, and buckets per DM recipient (PROTOCOL.md section 6)."""
from __future__ import annotations

import time
from collections import OrderedDict


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; every request takes one.

    Tokens are computed on demand from the clock rather than refilled by a timer, so an
    idle connection costs no greenlet and no wake-up.
    """

    __slots__ = ("rate", "burst", "max_strikes", "_tokens", "_stamp", "strikes", "_strikes_before")

    def __init__(self, rate: float, burst: int, max_strikes: int, clock: float | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.max_strikes = max_strikes
        self._tokens = float(burst)
        self._stamp = time.monotonic() if clock is None else clock
        self.strikes = 0
        self._strikes_before = 0  # the count take() last reset, for strike()

    def take(self, now: float | None = None) -> bool:
        """True if the request may proceed; False counts a strike (see :attr:`struck_out`)."""
        now = time.monotonic() if now is None else now
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            self._strikes_before, self.strikes = self.strikes, 0
            return True
        self._tokens = tokens
        self.strikes += 1
        return False

    def strike(self) -> None:
        """The request that just took a token was refused by another limit (a DM recipient's rate).

        It counts as one more limited request in a row, as if it had found no token: a
        client that only sends refused DMs is closed after ``max_strikes`` like any other.
        """
        self.strikes = self._strikes_before + 1

    def full(self, now: float) -> bool:
        """Refilled to ``burst``: the bucket is as good as a new one."""
        return self._tokens + (now - self._stamp) * self.rate >= self.burst

    @property
    def struck_out(self) -> bool:
        return self.strikes >= self.max_strikes


class RecipientRates:
    """A token bucket per key (a DM recipient), kept only while it is not full.

    A full bucket is as good as none, so buckets are dropped once refilled: the map holds
    the keys used within the last ``burst / rate`` seconds, never one per key ever used.
    It is ordered by last use, so each call drops refilled buckets from the front: O(1)
    amortised, no scan (the front bucket not being full means every later one was used
    even more recently).
    """

    __slots__ = ("rate", "burst", "_buckets")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate  # 0: no limit
        self.burst = burst
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> bool:
        if not self.rate:
            return True
        now = time.monotonic() if now is None else now
        buckets = self._buckets
        while buckets and next(iter(buckets.values())).full(now):
            buckets.popitem(last=False)
        bucket = buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, 1, now)
        buckets[key] = bucket  # the most recently used last
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
