"""Prometheus metrics of one gochat process, kept as plain numbers and exported at scrape time.

Why not prometheus-client's Counter objects on the hot path? Each ``inc`` takes a lock,
and under gevent's monkey-patching that lock is a gevent lock: several microseconds per
event, paid per message and per connection. Here an event costs an integer addition, and
a custom collector turns the numbers into metric families when /metrics is read. A private
registry keeps /metrics to gochat_* names only (the default one adds python_* and
process_*). Gauges that mirror live state are read at scrape time through callbacks.

Every label value known in advance (error codes, close reasons, rejection reasons) is
exported at 0 from the start (PITFALLS.md, Prometheus): a series that appears only with its
first event has no earlier sample, so ``rate()`` and the alerts on it miss that event.
"""
from __future__ import annotations

import bisect
from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from gochat.protocol import ERRORS


class Count:
    """A counter without labels."""

    __slots__ = ("name", "doc", "value")

    def __init__(self, name: str, doc: str) -> None:
        self.name, self.doc, self.value = name, doc, 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc)
        family.add_metric([], self.value)
        return family


class CountBy:
    """A counter with one label (a close reason, an error code, a message type)."""

    __slots__ = ("name", "doc", "label", "values")

    def __init__(self, name: str, doc: str, label: str, known: Iterable[str] = ()) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.values: dict[str, int] = dict.fromkeys(known, 0)

    def declare(self, label_values: Iterable[str]) -> None:
        """Export these label values at 0 until they happen, for label sets this module cannot
        import (conn.py's close reasons: conn.py imports this module)."""
        for value in label_values:
            self.values.setdefault(value, 0)

    def inc(self, label_value: str, amount: int = 1) -> None:
        self.values[label_value] = self.values.get(label_value, 0) + amount

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for value, count in sorted(self.values.items()):
            family.add_metric([value], count)
        return family


class Buckets:
    """A histogram: one ``bisect`` and two additions per observation."""

    __slots__ = ("name", "doc", "bounds", "counts", "sum")

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Metric:
        cumulative, total = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), total))
        family = HistogramMetricFamily(self.name, self.doc)
        family.add_metric([], cumulative, sum_value=self.sum)
        return family


# Why the admin HTTP server closed a connection before answering it (admin.py).
ADMIN_REFUSALS = ("max_connections", "request_timeout", "bad_host")
# Why the memory broker forgot a room with its history (broker/memory.py).
ROOM_FORGET_REASONS = ("lru", "ttl")

connections_accepted = Count("gochat_connections_accepted", "Connections accepted")
connections_rejected = CountBy("gochat_connections_rejected", "Connections refused at accept", "reason")
connections_closed = CountBy("gochat_connections_closed", "Connections closed, by close reason", "reason")
messages_in = CountBy("gochat_messages_in", "Requests received, by type", "type")
deliveries = Count("gochat_deliveries", "Messages queued to clients")
bytes_in = Count("gochat_bytes_in", "Bytes received from clients")
bytes_out = Count("gochat_bytes_out", "Bytes sent to clients")
errors_sent = CountBy("gochat_errors_sent", "Protocol errors sent, by code", "code", ERRORS)
rooms_forgotten = CountBy("gochat_rooms_forgotten", "Rooms the memory broker forgot with their history, by reason "
                          "(lru: at max_rooms; ttl: idle for room_ttl)", "reason", ROOM_FORGET_REASONS)
handler_exceptions = Count("gochat_handler_exceptions", "Unexpected exceptions in connection handlers")
sessions_ended_at_cap = Count("gochat_sessions_ended_at_cap", "Sessions awaiting resume ended early by max_sessions")
dms_rate_limited = Count("gochat_dms_rate_limited", "DMs refused over their recipient's dm_rate")
tls_handshake_failures = Count("gochat_tls_handshake_failures", "Failed TLS handshakes (not TLS, too old, peer gone)")
heartbeat_rtt = Buckets("gochat_heartbeat_rtt_seconds", "Round trip of server pings",
                        (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
admin_refused = CountBy("gochat_admin_refused", "Admin HTTP connections or requests refused, by reason", "reason",
                        ADMIN_REFUSALS)
fanout_latency = Buckets("gochat_fanout_seconds", "From a msg's arrival to its fan-out being queued",
                         (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1))
history_cut = Count("gochat_history_cut", "history replies and join replays cut by max_history_bytes (more: true)")

COUNTERS = (connections_accepted, connections_rejected, connections_closed, messages_in, deliveries, bytes_in,
            bytes_out, errors_sent, rooms_forgotten, handler_exceptions, sessions_ended_at_cap,
            dms_rate_limited, tls_handshake_failures, heartbeat_rtt, fanout_latency, admin_refused, history_cut)
_gauges: dict[str, tuple[str, Callable[[], float]]] = {}


def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
    """A gauge whose value is read from live state when scraped; a later call rebinds it."""
    _gauges[name] = (doc, read)


class _Collector:
    def collect(self) -> Iterator[Metric]:
        for metric in COUNTERS:
            yield metric.collect()
        for name, (doc, read) in _gauges.items():
            yield GaugeMetricFamily(name, doc, value=read())


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(_Collector())
