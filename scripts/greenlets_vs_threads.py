#!/usr/bin/env python3
"""What a blocked greenlet costs next to a blocked OS thread: creation time, memory, switches.

    python scripts/greenlets_vs_threads.py [--threads 10000] [--greenlets 100000] [--repeat 3]

Prints two markdown tables (docs/go-migration.md quotes them). Each measurement runs in a
fresh interpreter (this script with ``--measure``), so one's memory does not hide in the
next one's numbers, and the thread measurements never see gevent's monkey-patching.

* creation: start N threads (``threading.Thread``) or greenlets (``gevent.spawn``, and raw
  ``greenlet.greenlet``), each of which blocks on an event, and wait until every one of
  them is blocked; "RSS growth" is the resident memory added meanwhile, "virtual growth"
  the address space reserved (/proc/self/status: a thread reserves its whole stack).
  Then the event is set and every one is joined, so nothing leaks into the next number.
* switch cost: two threads or two greenlets hand a turn back and forth (ping-pong); a
  round trip is two switches. Threads use two ``threading.Event``; greenlets use
  ``greenlet.switch`` (raw), two ``gevent.event.Event`` (through the hub, as gevent code
  does), and two unbuffered ``gochat.gosync.Chan``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

DEFAULT_THREADS = 10_000
DEFAULT_GREENLETS = 100_000
THREAD_ROUND_TRIPS = 20_000
GREENLET_ROUND_TRIPS = 200_000
RAW_ROUND_TRIPS = 1_000_000


def memory_kib() -> tuple[int, int]:
    """(resident, virtual) size of this process, KiB."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmSize:")):
                found[line.split(":")[0]] = int(line.split()[1])
    return found["VmRSS"], found["VmSize"]


def grown(before: tuple[int, int]) -> dict:
    rss, vm = memory_kib()
    return {"rss_kib": rss - before[0], "vm_kib": vm - before[1]}


# ------------------------------------------------------------------ measurements (each in its own process)


def measure_threads(n: int) -> dict:
    import threading

    release = threading.Event()
    started = threading.Semaphore(0)

    def body() -> None:
        started.release()
        release.wait()

    threads = [threading.Thread(target=body, daemon=True) for _ in range(n)]
    before = memory_kib()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for _ in range(n):
        started.acquire()
    created = time.perf_counter() - t0
    growth = grown(before)
    release.set()
    for t in threads:
        t.join()
    return {"seconds": created, **growth}


def measure_greenlets(n: int) -> dict:
    import gevent
    from gevent.event import Event

    release = Event()
    running = 0

    def body() -> None:
        nonlocal running
        running += 1
        release.wait()

    gevent.sleep(0)  # start the hub before measuring
    before = memory_kib()
    t0 = time.perf_counter()
    greenlets = [gevent.spawn(body) for _ in range(n)]
    gevent.idle()  # every greenlet has run up to its wait
    created = time.perf_counter() - t0
    assert running == n
    growth = grown(before)
    release.set()
    gevent.joinall(greenlets)
    return {"seconds": created, **growth}


def measure_raw_greenlets(n: int) -> dict:
    from greenlet import getcurrent, greenlet

    main = getcurrent()

    def body() -> None:
        main.switch()  # parked: switched out with its stack saved, until switched back in

    before = memory_kib()
    t0 = time.perf_counter()
    parked = [greenlet(body) for _ in range(n)]
    for g in parked:
        g.switch()
    created = time.perf_counter() - t0
    growth = grown(before)
    for g in parked:
        g.switch()
    assert all(g.dead for g in parked)
    return {"seconds": created, **growth}


def measure_thread_switch(rounds: int) -> dict:
    import threading

    ping, pong = threading.Event(), threading.Event()

    def other() -> None:
        for _ in range(rounds):
            ping.wait()
            ping.clear()
            pong.set()

    t = threading.Thread(target=other)
    t.start()
    t0 = time.perf_counter()
    for _ in range(rounds):
        ping.set()
        pong.wait()
        pong.clear()
    elapsed = time.perf_counter() - t0
    t.join()
    return {"seconds": elapsed, "rounds": rounds}


def measure_raw_switch(rounds: int) -> dict:
    from greenlet import getcurrent, greenlet

    main = getcurrent()

    def other() -> None:
        while True:
            main.switch()

    g = greenlet(other)
    g.switch()
    t0 = time.perf_counter()
    for _ in range(rounds):
        g.switch()
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "rounds": rounds}


def measure_event_switch(rounds: int) -> dict:
    import gevent
    from gevent.event import Event

    ping, pong = Event(), Event()

    def other() -> None:
        for _ in range(rounds):
            ping.wait()
            ping.clear()
            pong.set()

    g = gevent.spawn(other)
    t0 = time.perf_counter()
    for _ in range(rounds):
        ping.set()
        pong.wait()
        pong.clear()
    elapsed = time.perf_counter() - t0
    g.join()
    return {"seconds": elapsed, "rounds": rounds}


def measure_chan_switch(rounds: int) -> dict:
    import gevent

    from gochat.gosync import Chan

    ping: Chan[int] = Chan()
    pong: Chan[int] = Chan()

    def other() -> None:
        for value in ping:
            pong.send(value)

    g = gevent.spawn(other)
    t0 = time.perf_counter()
    for i in range(rounds):
        ping.send(i)
        pong.recv()
    elapsed = time.perf_counter() - t0
    ping.close()
    g.join()
    return {"seconds": elapsed, "rounds": rounds}


MEASURES = {
    "threads": measure_threads, "greenlets": measure_greenlets, "raw_greenlets": measure_raw_greenlets,
    "thread_switch": measure_thread_switch, "raw_switch": measure_raw_switch,
    "event_switch": measure_event_switch, "chan_switch": measure_chan_switch,
}


# ------------------------------------------------------------------ driver


def run(measure: str, n: int, repeat: int) -> dict:
    """The fastest of ``repeat`` runs, each in a fresh interpreter (timeit's rule: the
    minimum is the run least disturbed by the rest of the machine)."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--measure", measure, str(n)], capture_output=True,
                             text=True, timeout=600, check=True)
        runs.append(json.loads(out.stdout))
    return min(runs, key=lambda r: r["seconds"])


def machine() -> str:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    import gevent
    import greenlet

    return (f"{os.cpu_count()} cores ({cpu}), {mem_kib / 2**20:.0f} GiB RAM, Linux {platform.release()}; "
            f"CPython {platform.python_version()}, gevent {gevent.__version__}, greenlet {greenlet.__version__}")


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.2f} µs"
    return f"{seconds * 1e9:.0f} ns"


def fmt_kib(kib: float) -> str:
    if kib >= 2**20:
        return f"{kib / 2**20:.1f} GiB"
    return f"{kib / 1024:.1f} MiB" if kib >= 1024 else f"{kib:.1f} KiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--greenlets", type=int, default=DEFAULT_GREENLETS)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the fastest is shown")
    parser.add_argument("--measure", nargs=2, metavar=("WHAT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        what, n = args.measure
        print(json.dumps(MEASURES[what](int(n))))
        return 0

    print(f"Machine: {machine()}; fastest of {args.repeat} runs")
    print()
    print("| blocked on an event | count | time to start all | per unit | RSS growth | per unit | virtual growth |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, what, n in (
        ("OS threads (`threading.Thread`, `threading.Event`)", "threads", args.threads),
        ("greenlets (`gevent.spawn`, `gevent.event.Event`)", "greenlets", args.greenlets),
        ("raw greenlets (`greenlet.greenlet`, parked by a switch)", "raw_greenlets", args.greenlets),
    ):
        r = run(what, n, args.repeat)
        print(f"| {label} | {n:,} | {fmt_time(r['seconds'])} | {fmt_time(r['seconds'] / n)} "
              f"| {fmt_kib(r['rss_kib'])} | {fmt_kib(r['rss_kib'] / n)} | {fmt_kib(r['vm_kib'])} |")
    print()
    print("| ping-pong between two | round trips | per round trip | per switch |")
    print("|---|---:|---:|---:|")
    for label, what, rounds in (
        ("OS threads, two `threading.Event`", "thread_switch", THREAD_ROUND_TRIPS),
        ("raw greenlets, `greenlet.switch()`", "raw_switch", RAW_ROUND_TRIPS),
        ("gevent greenlets, two `gevent.event.Event`", "event_switch", GREENLET_ROUND_TRIPS),
        ("gevent greenlets, two unbuffered `gochat.gosync.Chan`", "chan_switch", GREENLET_ROUND_TRIPS),
    ):
        r = run(what, rounds, args.repeat)
        per = r["seconds"] / r["rounds"]
        print(f"| {label} | {rounds:,} | {fmt_time(per)} | {fmt_time(per / 2)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
