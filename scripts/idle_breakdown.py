"""Where the memory of an idle gochat connection goes, line by line (tracemalloc).

    python scripts/idle_breakdown.py [--conns 4000] [--loadgen bench-results/bin/loadgen]

Runs a gochat server in this process with tracemalloc on, holds ``--conns`` idle
connections (hello + join, 100 per room) from the Go load generator in another process,
waits until every one is parked, and prints the traced growth per connection by source
line. The bench's RSS figure (docs/performance.md, idle) also counts allocator overhead
and the interpreter's own pages; this shows what gochat and gevent allocate. The load
generator is built by ``python scripts/bench.py`` (or ``cd scripts/loadgen && go build``).
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import linecache  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import gevent  # noqa: E402

from gochat.config import load  # noqa: E402
from gochat.server import Server  # noqa: E402

SETTLE_TIMEOUT = 60.0  # seconds for every connection to connect, join and park


def short(filename: str) -> str:
    for marker in ("site-packages/", "/gochat/"):
        if marker in filename:
            return ("gochat/" if marker == "/gochat/" else "") + filename.split(marker, 1)[1]
    return filename


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conns", type=int, default=4000)
    parser.add_argument("--loadgen", default="bench-results/bin/loadgen")
    parser.add_argument("--top", type=int, default=20, help="lines to show")
    args = parser.parse_args()

    tracemalloc.start(1)
    config = load("prod", None, flags={"host": "127.0.0.1", "port": 0, "admin_port": 0, "log_level": "warning"})
    server = Server(config)
    server.start()
    gevent.sleep(0.2)
    gc.collect()
    before = tracemalloc.take_snapshot()
    holder = subprocess.Popen([args.loadgen, "-addr", f"127.0.0.1:{server.address[1]}", "-proto", "gochat",
                               "-mode", "idle", "-conns", str(args.conns), "-rooms", str(max(1, args.conns // 100)),
                               "-hold", str(int(SETTLE_TIMEOUT) + 30)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while sum(1 for c in server.connections if c.parked) < args.conns or len(server.pool):
            if time.monotonic() > deadline or holder.poll() is not None:
                raise SystemExit(f"only {len(server.connections)} connections held, "
                                 f"{sum(1 for c in server.connections if c.parked)} parked")
            gevent.sleep(0.2)
        gc.collect()
        after = tracemalloc.take_snapshot()
        readers = len(server.pool)
    finally:
        holder.kill()
        holder.wait()
    stats = after.compare_to(before, "lineno")
    n = args.conns
    print(f"{n} idle connections, all parked; traced growth {sum(s.size_diff for s in stats) / n:.0f} B "
          f"per connection; reader greenlets {readers}")
    for stat in stats[:args.top]:
        frame = stat.traceback[0]
        code = linecache.getline(frame.filename, frame.lineno).strip()
        print(f"{stat.size_diff / n:7.0f} B  {short(frame.filename)}:{frame.lineno}  {code[:70]}")


if __name__ == "__main__":
    main()
