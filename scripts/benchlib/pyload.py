"""A second, independent fan-out load generator for the raw line broadcaster
(examples/go/chat), in Python with gevent. bench.py --compare-generators runs it
against the Go reference beside scripts/loadgen, to check that the Go loadgen
drives the reference at least as hard as another tool does.

    python scripts/benchlib/pyload.py -addr 127.0.0.1:9100 -members 1000 -senders 10 \
        -window 4 -size 100 -duration 10

Same scenario as `loadgen -mode fanout -proto raw`: -members sockets only read;
-senders sockets each keep at most -window lines in flight (a line completes
when the sender reads its own line back: the broadcaster echoes to everyone);
after -duration the senders stop and the tool waits up to -drain for every
member to have every line. Members count lines (newlines) without parsing them.
Prints one JSON object on stdout: deliveries_per_s = delivered / duration_s.
"""

from __future__ import annotations

import gevent.monkey

gevent.monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.lock import Semaphore  # noqa: E402
from gevent.pool import Pool  # noqa: E402

SYNC = b"#pysync"


class Member:
    __slots__ = ("sock", "lines", "synced", "closed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines = 0
        self.synced = False
        self.closed = False

    def run(self) -> None:
        recv = self.sock.recv
        try:
            while True:
                data = recv(262144)
                if not data:
                    break
                self.lines += data.count(b"\n")
                if not self.synced and SYNC in data:
                    self.synced = True
        except OSError:
            pass
        self.closed = True


class Sender:
    def __init__(self, idx: int, sock: socket.socket, window: int, size: int) -> None:
        self.idx = idx
        self.sock = sock
        self.window = window
        self.size = size
        self.slots = Semaphore(window)
        self.prefix = b"p%d " % idx
        self.sent = 0
        self.echoed = 0
        self.synced = False
        self.closed = False

    def line(self, seq: int) -> bytes:
        head = b"p%d %d %d " % (self.idx, seq, time.time_ns())
        return head + b"x" * max(0, self.size - len(head)) + b"\n"

    def reader(self) -> None:
        buf = b""
        prefix = self.prefix
        try:
            while True:
                data = self.sock.recv(262144)
                if not data:
                    break
                buf += data
                lines = buf.split(b"\n")
                buf = lines.pop()
                for ln in lines:
                    if ln.startswith(prefix):
                        self.echoed += 1
                        self.slots.release()
                    elif not self.synced and ln.startswith(SYNC):
                        self.synced = True
        except OSError:
            pass
        self.closed = True
        # Wake a sender blocked on the window.
        for _ in range(self.window):
            self.slots.release()

    def send_loop(self, stop_at: float) -> None:
        try:
            while time.monotonic() < stop_at and not self.closed:
                if not self.slots.acquire(timeout=0.05):
                    continue
                batch = [self.line(self.sent + 1)]
                self.sent += 1
                # Fill the rest of the window in the same write.
                while self.slots.acquire(blocking=False):
                    batch.append(self.line(self.sent + 1))
                    self.sent += 1
                self.sock.sendall(b"".join(batch))
        except OSError:
            self.closed = True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-addr", default="127.0.0.1:9100")
    ap.add_argument("-members", type=int, default=100)
    ap.add_argument("-senders", type=int, default=4)
    ap.add_argument("-window", type=int, default=4)
    ap.add_argument("-size", type=int, default=100)
    ap.add_argument("-duration", type=float, default=10.0)
    ap.add_argument("-drain", type=float, default=3.0)
    ap.add_argument("-dial-concurrency", type=int, default=64)
    a = ap.parse_args()
    host, _, port = a.addr.rpartition(":")
    t_start = time.monotonic()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def dial() -> socket.socket:
        s = socket.create_connection((host, int(port)), timeout=10)
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    errors: dict[str, int] = {}
    pool = Pool(a.dial_concurrency)
    socks = pool.map(lambda _: _try(dial, errors), range(a.members + a.senders))
    members = [Member(s) for s in socks[: a.members] if s is not None]
    senders = [Sender(i, s, a.window, a.size) for i, s in enumerate(x for x in socks[a.members:] if x is not None)]
    if not members or not senders:
        print(json.dumps({"error": "setup failed", "errors": errors}))
        return 1
    greenlets = [gevent.spawn(m.run) for m in members] + [gevent.spawn(s.reader) for s in senders]

    # The broadcaster registers a client after accept; send sync lines until
    # every connection has seen one, then let stragglers arrive.
    sync_deadline = time.monotonic() + 10
    while time.monotonic() < sync_deadline:
        senders[0].sock.sendall(SYNC + b"\n")
        gevent.sleep(0.05)
        if all(m.synced or m.closed for m in members) and all(s.synced or s.closed for s in senders):
            break
    gevent.sleep(0.2)
    setup_s = time.monotonic() - t_start
    base = [m.lines for m in members]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)

    t0 = time.monotonic()
    stop_at = t0 + a.duration
    send_gl = [gevent.spawn(s.send_loop, stop_at) for s in senders]
    gevent.joinall(send_gl, timeout=a.duration + 5)
    duration = time.monotonic() - t0
    sent = sum(s.sent for s in senders)

    d0 = time.monotonic()
    want = sent
    while time.monotonic() - d0 < a.drain:
        if all(m.closed or m.lines - b >= want for m, b in zip(members, base)):
            break
        gevent.sleep(0.005)
    drain_s = time.monotonic() - d0
    delivered = sum(m.lines - b for m, b in zip(members, base))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    disconnected = sum(m.closed for m in members)

    for s in [*members, *senders]:
        try:
            s.sock.close()
        except OSError:
            pass
    gevent.killall(greenlets, timeout=2)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "tool": "pyload (python+gevent)",
        "mode": "fanout", "proto": "raw", "addr": a.addr,
        "members": a.members, "senders": a.senders, "window": a.window, "size": a.size,
        "members_ok": len(members), "senders_ok": len(senders), "errors": errors,
        "setup_s": round(setup_s, 3), "duration_s": round(duration, 3), "drain_s": round(drain_s, 3),
        "sent": sent, "echoed": sum(s.echoed for s in senders),
        "expected": sent * len(members), "delivered": delivered,
        "missing": max(0, sent * len(members) - delivered),
        "members_disconnected": disconnected,
        "msgs_per_s": round(sent / duration, 3) if duration > 0 else 0,
        "deliveries_per_s": round(delivered / duration, 3) if duration > 0 else 0,
        "send_phase_cpu_s": round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 3),
        "cpu_user_s": round(ru.ru_utime, 3), "cpu_sys_s": round(ru.ru_stime, 3),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 3), "max_rss_kb": ru.ru_maxrss,
        "wall_s": round(time.monotonic() - t_start, 3),
    }
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


def _try(fn, errors):
    try:
        return fn()
    except OSError as exc:
        kind = type(exc).__name__
        errors[kind] = errors.get(kind, 0) + 1
        return None


if __name__ == "__main__":
    sys.exit(main())
