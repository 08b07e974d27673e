"""What one idle connection must cost at the least, here: the floor under gochat's figure.

    python scripts/idle_floor.py [N]

Blocks N greenlets in ``recv`` on socketpairs (what an idle connection's handler greenlet
costs while it waits) and reports the RSS growth per greenlet, beside a raw greenlet and a
bare libev watcher (no greenlet at all: what a parked gochat connection waits on instead,
conn.py). ``scripts/idle_breakdown.py`` shows, line by line, everything else a parked
connection holds.
"""
from __future__ import annotations

import gc
import subprocess
import sys

import gevent
import greenlet
from gevent import socket as gsocket


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS")).split()[1])


def measure(kind: str, n: int) -> float:
    pairs = [gsocket.socketpair() for _ in range(n)]
    gc.collect()
    before = rss_kib()
    hub = gevent.get_hub()
    keep = []
    for a, _ in pairs:
        if kind == "gevent.spawn, blocked in recv":
            keep.append(gevent.spawn(a.recv, 100))
        elif kind == "raw greenlet, blocked in recv":
            g = greenlet.greenlet(a.recv, parent=hub)
            hub.loop.run_callback(g.switch, 100)
            keep.append(g)
        else:
            watcher = hub.loop.io(a.fileno(), 1)
            watcher.start(lambda: None)
            keep.append(watcher)
    gevent.sleep(0.2)
    gc.collect()
    return (rss_kib() - before) / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    if len(sys.argv) > 2:  # a fresh interpreter per kind: no reuse of freed memory between kinds
        print(f"{measure(sys.argv[2], n):.2f}")
        return
    print(f"| idle unit ({n} of them, one process each kind) | RSS per unit |")
    print("|---|---:|")
    for kind in ("gevent.spawn, blocked in recv", "raw greenlet, blocked in recv", "libev io watcher, no greenlet"):
        out = subprocess.run([sys.executable, __file__, str(n), kind], capture_output=True, text=True, check=True)
        print(f"| {kind} | {float(out.stdout):.2f} KiB |")


if __name__ == "__main__":
    main()
