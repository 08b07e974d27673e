"""Per-connection heartbeat timing, fixed or adapted to the connection's measured round trips.

Adaptive mode follows the source article's table: a stable link keeps the configured
interval and idle timeout (30 s / 90 s by default), a jittery one is pinged twice as often
(15 s / 45 s) so a dying link is noticed sooner, and a high-latency one half as often
(60 s / 180 s) so slow pongs are not mistaken for death. The idle timeout stays three
intervals, as configured. Clients change nothing: they answer pings as always.
"""
from __future__ import annotations

from gochat.config import Config

EWMA_WEIGHT = 0.25  # weight of the newest round trip (TCP's RTO estimator uses 1/8 and 1/4)
MIN_SAMPLES = 3  # pongs before the profile may change
PROFILES = {"stable": 1.0, "jittery": 0.5, "high_latency": 2.0}  # factor on heartbeat and idle_timeout


class Heartbeat:
    __slots__ = ("adaptive", "base_interval", "base_idle", "high_rtt", "jitter_limit", "rtt", "jitter",
                 "samples", "profile")

    def __init__(self, config: Config) -> None:
        self.adaptive = config.heartbeat_mode == "adaptive"
        self.base_interval = config.heartbeat
        self.base_idle = config.idle_timeout
        self.high_rtt = config.heartbeat_high_rtt
        self.jitter_limit = config.heartbeat_jitter
        self.rtt = 0.0
        self.jitter = 0.0
        self.samples = 0
        self.profile = "stable"

    @property
    def interval(self) -> float:
        return self.base_interval * PROFILES[self.profile]

    @property
    def idle_timeout(self) -> float:
        return self.base_idle * PROFILES[self.profile]

    def observe(self, rtt: float) -> None:
        """One ping's round trip, in seconds."""
        if self.samples == 0:
            self.rtt = rtt
        else:
            self.jitter += EWMA_WEIGHT * (abs(rtt - self.rtt) - self.jitter)
            self.rtt += EWMA_WEIGHT * (rtt - self.rtt)
        self.samples += 1
        if self.adaptive and self.samples >= MIN_SAMPLES:
            if self.rtt > self.high_rtt:
                self.profile = "high_latency"
            elif self.jitter > self.jitter_limit:
                self.profile = "jittery"
            else:
                self.profile = "stable"
