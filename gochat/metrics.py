"""Prometheus metrics of one gochat process, in a registry of their own.

A private registry keeps /metrics to gochat_* names only (the default registry adds
python_* and process_* collectors). Counters are bumped where the event happens; gauges
that mirror live state are read at scrape time through callbacks, so the hot path pays
nothing for them.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

connections_accepted = Counter("gochat_connections_accepted", "Connections accepted", registry=REGISTRY)
connections_rejected = Counter("gochat_connections_rejected", "Connections refused at accept",
                               ["reason"], registry=REGISTRY)
connections_closed = Counter("gochat_connections_closed", "Connections closed, by close reason",
                             ["reason"], registry=REGISTRY)
messages_in = Counter("gochat_messages_in", "Requests received, by type", ["type"], registry=REGISTRY)
deliveries = Counter("gochat_deliveries", "Messages queued to clients", registry=REGISTRY)
bytes_in = Counter("gochat_bytes_in", "Bytes received from clients", registry=REGISTRY)
bytes_out = Counter("gochat_bytes_out", "Bytes sent to clients", registry=REGISTRY)
errors_sent = Counter("gochat_errors_sent", "Protocol errors sent, by code", ["code"], registry=REGISTRY)
handler_exceptions = Counter("gochat_handler_exceptions", "Unexpected exceptions in connection handlers",
                             registry=REGISTRY)
heartbeat_rtt = Histogram("gochat_heartbeat_rtt_seconds", "Round trip of server pings",
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                          registry=REGISTRY)
fanout_latency = Histogram("gochat_fanout_seconds", "From a msg's arrival to its fan-out being queued",
                           buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1),
                           registry=REGISTRY)


_gauges: dict[str, Gauge] = {}


def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
    """A gauge whose value is read from live state when scraped; a later call rebinds it."""
    if name not in _gauges:
        _gauges[name] = Gauge(name, doc, registry=REGISTRY)
    _gauges[name].set_function(read)
