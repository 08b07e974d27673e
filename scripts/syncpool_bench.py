"""Is gochat.syncpool worth a place on the read path? Measures both ways, in one run.

    python scripts/syncpool_bench.py

1. Throughput of the read step alone, on a socketpair carrying chat-sized lines:
   ``sock.recv(65536)`` (a fresh bytes object sized to what arrived, what conn.py does)
   against ``sock.recv_into(pooled 64 KiB buffer)`` plus the copy the decoder needs.
2. What each costs an idle connection: with recv nothing is held while waiting; a pooled
   buffer taken for the wait (the Go way: one bufio.Reader per connection) pins 64 KiB.
Prints a markdown table; ratios are against the recv baseline measured in the same run.
"""
from __future__ import annotations

import socket
import time

from gochat.syncpool import Pool

RECV_BYTES = 65536
LINE = b'{"type":"msg","room":"lobby","text":"' + b"x" * 60 + b'","id":1}\n'
ROUNDS = 200_000


def run(batch: int, pooled: bool) -> float:
    """Reads per second for `batch` lines arriving at a time."""
    a, b = socket.socketpair()
    pool: Pool[bytearray] = Pool(lambda: bytearray(RECV_BYTES))
    payload = LINE * batch
    started = time.perf_counter()
    for _ in range(ROUNDS // batch):
        a.sendall(payload)
        if pooled:
            buf = pool.get()
            n = b.recv_into(buf)
            data = bytes(memoryview(buf)[:n])  # the decoder keeps the bytes beyond this call
            pool.put(buf)
        else:
            data = b.recv(RECV_BYTES)
        assert len(data) == len(payload)
    elapsed = time.perf_counter() - started
    a.close()
    b.close()
    return (ROUNDS // batch) / elapsed


def main() -> None:
    print("| lines per read | recv (baseline) reads/s | pooled recv_into reads/s | pooled : recv |")
    print("|---:|---:|---:|---:|")
    for batch in (1, 10, 100):
        plain = max(run(batch, False) for _ in range(3))
        pooled = max(run(batch, True) for _ in range(3))
        print(f"| {batch} | {plain:,.0f} | {pooled:,.0f} | {pooled / plain:.2f} |")
    print()
    print("| idle connection holds | recv | pooled buffer held across the wait |")
    print("|---|---:|---:|")
    print(f"| read buffer | 0 B | {RECV_BYTES:,} B |")


if __name__ == "__main__":
    main()
