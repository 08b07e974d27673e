"""Per-connection request limits: the token bucket and its strike counter (PROTOCOL.md section 6)."""
from __future__ import annotations

import time


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; every request takes one.

    Tokens are computed on demand from the clock rather than refilled by a timer, so an
    idle connection costs no greenlet and no wake-up.
    """

    __slots__ = ("rate", "burst", "max_strikes", "_tokens", "_stamp", "strikes")

    def __init__(self, rate: float, burst: int, max_strikes: int, clock: float | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.max_strikes = max_strikes
        self._tokens = float(burst)
        self._stamp = time.monotonic() if clock is None else clock
        self.strikes = 0

    def take(self, now: float | None = None) -> bool:
        """True if the request may proceed; False counts a strike (see :attr:`struck_out`)."""
        now = time.monotonic() if now is None else now
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            self.strikes = 0
            return True
        self._tokens = tokens
        self.strikes += 1
        return False

    @property
    def struck_out(self) -> bool:
        return self.strikes >= self.max_strikes
