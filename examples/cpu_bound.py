"""cpu_bound: what CPU-bound work in a greenlet does to every other connection, and the way out.

No Go twin: in Go the same work runs on another core while the scheduler keeps serving.
Under gevent every greenlet shares one OS thread, so a greenlet that computes for 300 ms
stops *all* of them for 300 ms. A "heartbeat" greenlet below wakes every 10 ms and records
how late it woke; the same work then runs three ways:

    inline        in the greenlet itself: the heartbeat stalls for the whole computation
    threadpool    gevent.get_hub().threadpool.spawn(fn, ...).get(): the calling greenlet
                  waits, the others run; hashlib releases the GIL, so the hash runs in
                  parallel with the event loop
    threadpool-py the same with a pure-Python loop: the loop stays responsive (the GIL is
                  handed over every sys.getswitchinterval(), 5 ms), but the two share one
                  core; for real parallel CPU use processes (gochat: --workers)

    python examples/cpu_bound.py

Prints one line per way: "<way>: work <ms> ms, heartbeat late by up to <ms> ms".
"""
from gevent import monkey

monkey.patch_all()

import hashlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import gevent  # noqa: E402

TICK = 0.01  # seconds between heartbeats
KDF_ROUNDS = 300_000


def kdf() -> bytes:
    """A password hash: C code that releases the GIL while it works."""
    return hashlib.pbkdf2_hmac("sha256", b"correct horse", b"battery staple", KDF_ROUNDS)


def pure_python() -> int:
    """The same order of work in Python bytecode: it holds the GIL."""
    total = 0
    for i in range(3_000_000):
        total += i * i
    return total


def heartbeat(lateness: list[float]) -> None:
    while True:
        due = time.perf_counter() + TICK
        gevent.sleep(TICK)
        lateness.append(time.perf_counter() - due)


def measure(way: str, run: Callable[[], object]) -> None:
    lateness: list[float] = []
    beating = gevent.spawn(heartbeat, lateness)
    gevent.sleep(3 * TICK)  # let it settle into its rhythm
    started = time.perf_counter()
    run()
    work = time.perf_counter() - started
    gevent.sleep(2 * TICK)
    beating.kill()
    print(f"{way}: work {work * 1000:.0f} ms, heartbeat late by up to {max(lateness) * 1000:.0f} ms")


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    pool = gevent.get_hub().threadpool
    measure("inline", kdf)
    measure("threadpool", lambda: pool.spawn(kdf).get())
    measure("threadpool-py", lambda: pool.spawn(pure_python).get())


if __name__ == "__main__":
    main()
