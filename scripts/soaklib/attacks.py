"""The attacks of scripts/soak.py, each a loop of waves until its deadline.

The per-connection attack primitives are the ones of tests/test_robustness.py (imported
from there, so the soak and the default test suite attack the server in exactly the same
ways); this module repeats them in volume, from source addresses of their own, and tallies
what happened: connections opened, errors the server answered (by code), messages lost,
and "notes" for anything that broke a check (an assertion of a primitive, a timeout).

Runs in a worker process that gevent has monkey-patched (scripts/soak.py --worker NAME).
"""
from __future__ import annotations

import json
import random
import re
import resource
import socket
import struct
import subprocess
import sys
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import gevent
from gevent.event import Event
from gevent.pool import Pool

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_robustness as tr  # noqa: E402  (the attack primitives)

from gochat.client import Client  # noqa: E402

from soaklib import SETTINGS  # noqa: E402
from soaklib.steady import SteadyReader  # noqa: E402

HANDSHAKE_TIMEOUT = SETTINGS["handshake_timeout"]
IDLE_TIMEOUT = SETTINGS["idle_timeout"]
RATE = SETTINGS["rate"]


class Tally:
    """What one attack did and saw."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections = 0
        self.errors: Counter = Counter()
        self.lost = 0
        self.notes: Counter = Counter()
        self.examples: dict[str, str] = {}  # note -> its first occurrence, numbers and all
        self.waves = 0
        self.figures: dict[str, Any] = {}  # what the report shows beside the table (victim closes, ...)

    def note(self, what: str) -> None:
        """Count a failed check; notes that differ only in numbers (seeds, ports, seqs) count as one."""
        what = what[:160]
        key = re.sub(r"\d+", "N", what)
        self.examples.setdefault(key, what)
        self.notes[key] += 1

    def fail(self, exc: BaseException) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "test_robustness" in f.filename or "soaklib" in f.filename] or frames
        where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else ""
        self.note(f"{type(exc).__name__}{where}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def as_dict(self) -> dict:
        notes = {(self.examples[k] if self.examples[k] == k else f"{k}, e.g. {self.examples[k]}"): n
                 for k, n in self.notes.items()}
        return {"attack": self.name, "connections": self.connections, "errors": dict(self.errors),
                "lost": self.lost, "notes": notes, "waves": self.waves, "figures": self.figures}


class Ctx:
    def __init__(self, port: int, seconds: float, seed: int, scale: float = 1.0, part: int = 0,
                 tls_port: int = 0, tls_cert: str = "") -> None:
        self.scale = scale  # the size of waves (every attack at once runs them smaller)
        self.port = port
        self.part = part  # which of the attack's processes this is (soaklib.hostile.PROCESSES)
        self.tls_port, self.tls_cert = tls_port, tls_cert  # the soak's TLS server
        self.deadline = time.monotonic() + seconds
        self.seed = seed
        self.rng = random.Random(seed)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def n(self, count: int) -> int:
        return max(1, int(count * self.scale))


def guarded(tally: Tally, func: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run one primitive; a failed check or an exception becomes a note, not the end of the attack."""
    try:
        return func(*args, **kwargs)
    except (Exception, gevent.Timeout) as exc:  # noqa: BLE001 - everything a client can see
        tally.fail(exc)
        return None


def run_wave(tally: Tally, func: Callable, items: list, concurrency: int, timeout: float) -> list:
    pool = Pool(concurrency)
    jobs = [pool.spawn(guarded, tally, func, item) for item in items]
    if len(gevent.joinall(jobs, timeout=timeout)) < len(jobs):
        tally.note(f"wave still running after {timeout:.0f} s")
        pool.kill(timeout=5)
    tally.waves += 1
    return [job.value for job in jobs]


def codes_in(received: bytes, codec: str) -> Counter:
    """The error codes in what a server sent, in a given codec ("unparsable" if it is not that codec)."""
    try:
        return _codes_in(received, codec)
    except ValueError:
        return Counter({f"unparsable {codec}: {received[:60]!r}": 1})


def _codes_in(received: bytes, codec: str) -> Counter:
    codes: Counter = Counter()
    if codec == "frames":
        pos = 0
        while pos + 8 <= len(received):
            n, crc = struct.unpack(">II", received[pos:pos + 8])
            payload = received[pos + 8:pos + 8 + n]
            pos += 8 + n
            if len(payload) == n and zlib.crc32(payload) == crc:
                message = json.loads(payload)
                if message.get("type") == "error":
                    codes[message["code"]] += 1
    elif codec == "json":
        for line in received.splitlines():
            if line.strip():
                message = json.loads(line)
                if message.get("type") == "error":
                    codes[message["code"]] += 1
    else:
        for line in received.decode(errors="replace").splitlines():
            if line.startswith("! "):
                codes[line[2:].split(":")[0]] += 1
    return codes


# ---------------------------------------------------------------- the attacks


SLOWLORIS = {  # kind: (codec, the errors it must get, the timeout that must reclaim it)
    "silent": ("json", {}, HANDSHAKE_TIMEOUT),
    "blanks": ("json", {}, HANDSHAKE_TIMEOUT),
    "magic_prefix": ("frames", {}, HANDSHAKE_TIMEOUT),
    "half_hello": ("json", {"handshake_timeout": 1}, HANDSHAKE_TIMEOUT),
    "half_nick": ("text", {"handshake_timeout": 1}, HANDSHAKE_TIMEOUT),
    "mute_json": ("json", {"idle_timeout": 1}, IDLE_TIMEOUT),
    "mute_frames": ("frames", {"idle_timeout": 1}, IDLE_TIMEOUT),
}


def slowloris(ctx: Ctx, t: Tally) -> None:
    """Waves of 280 slow connections from 20 addresses; each must be closed by its timeout."""
    kinds = list(SLOWLORIS)
    stop = Event()
    while ctx.left() > IDLE_TIMEOUT + 2:
        items = [(kinds[i % len(kinds)], f"127.0.1.{i % 20 + 1}") for i in range(ctx.n(280))]
        results = run_wave(t, lambda item: tr.slowloris(ctx.port, item[0], stop, item[1]), items, 300, 30)
        for result in results:
            if result is None:
                continue
            kind, received, lifetime, local = result
            codec, want, timeout = SLOWLORIS[kind]
            t.connections += 1
            codes = codes_in(received, codec)
            t.errors.update(codes)
            if codes != Counter(want):
                t.note(f"{kind} from {local}: answered {received[:100]!r}, want {want}")
            if lifetime > timeout + 3:  # + ticker, + 1 s lingering close, + this process waiting for CPU
                t.note(f"{kind}: reclaimed late")


def garbage(ctx: Ctx, t: Tally) -> None:
    """Rounds of tests/test_robustness.py's garbage (catalog, wrong types, random bytes, fuzz)."""
    n = 0
    while ctx.left() > 4:
        # spread over 20 addresses: a closed connection may linger in the server for up to
        # a second (after an error), still counting toward its address's max_conns_per_ip
        jobs = [(f, arg, f"127.0.2.{k % 20 + 1}") for k, (f, arg) in enumerate(tr.garbage_jobs(ctx.seed * 100 + n))]
        results = run_wave(t, lambda job: job[0](ctx.port, job[1], job[2]), jobs, ctx.n(80), 90)
        t.connections += len(jobs)
        for codes in results:
            if codes:
                t.errors.update(codes)
        n += 1


def _drained_by_server(sock: socket.socket, timeout: float) -> bool:
    """Read a stuck member's socket to its end: True if the server closed it."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 20):
            pass
        return True
    except ConnectionResetError:
        return True
    except OSError:
        return False


def _keep_writing(p: tr.Peer) -> None:
    try:
        for _ in range(600):  # bounded: 5 minutes
            p.send({"type": "pong"})
            gevent.sleep(0.5)
    except OSError:
        pass  # dropped


def slow_consumers(ctx: Ctx, t: Tally) -> None:
    """Cycles: 10 members that never read and 2 readers in a room flooded with 6 MB by 4
    senders; every stuck member must be dropped, every reader must get every message."""
    cycle = 0
    while ctx.left() > 5:
        room = f"slow{cycle % 3}"  # rooms keep their history: reuse a few (see SETTINGS)
        stuck, readers, senders, keepalives = [], [], [], []
        try:
            for k in range(10):
                p = tr.Peer(ctx.port, source="127.0.3.1", rcvbuf=4096)
                p.hello(tr.unique_nick("stuck"))
                p.send({"type": "join", "room": room, "id": "j"})
                p.expect("joined", id="j")
                stuck.append(p)
            # It never reads, but it writes now and then (a pong is exempt from the rate limit):
            # any bytes are liveness, so idle_timeout cannot be what ends it.
            keepalives = [gevent.spawn(_keep_writing, p) for p in stuck]
            readers = [SteadyReader(ctx.port, tr.unique_nick("sr"), room, "127.0.3.2") for _ in range(2)]
            for r in readers:
                r.start()
            senders = [Client("127.0.0.1", ctx.port, source="127.0.3.3") for _ in range(4)]
            for s in senders:
                s.hello(nick=tr.unique_nick("ss"))
                s.join(room)
            t.connections += 16
            acked: dict[int, float] = {}

            def send(client: Client) -> None:  # 375 messages of 4 KB, within the rate limit
                for _ in range(375 // 25):
                    started = time.monotonic()
                    for _ in range(24):
                        client.send_nowait({"type": "msg", "room": room, "text": "s" * 4000})
                    acked[client.send(room, "s" * 4000)["seq"]] = time.time()
                    gevent.sleep(max(0.0, 25 / (RATE * 0.8) - (time.monotonic() - started)))

            gevent.joinall([gevent.spawn(guarded, t, send, c) for c in senders], timeout=60)
            last = max(acked, default=0)
            dropped = sum(_drained_by_server(p.sock, 10) for p in stuck)
            t.errors["slow_consumer (dropped)"] += dropped
            if dropped < len(stuck):
                t.note(f"{len(stuck) - dropped} stuck members were not dropped")
            for r in readers:
                r.wait_for(last, timeout=30)
                t.lost += sum(1 for seq in range(r.base + 1, last + 1) if seq not in r.seqs)
                t.connections += r.connections - 1
                if r.drops:
                    t.note("a reader was dropped (and resumed)")
        except (Exception, gevent.Timeout) as exc:  # noqa: BLE001
            t.fail(exc)
        finally:
            gevent.killall(keepalives)
            for p in stuck:
                p.close()
            for r in readers:
                r.stop()
            for s in senders:
                s.close()
        t.waves += 1
        cycle += 1


CHURN_KINDS = ["close", "reset", "half_close", "bye", "resume_reset", "no_hello_reset", "half_hello_close", "text"]


def churn(ctx: Ctx, t: Tally) -> None:
    """connect/hello/join/close cycles of every kind (FIN, RST, half-close, bye, resume, silent
    dead peers...) from 20 addresses, 30 at a time, back to back until the deadline."""
    prefix = f"ch{ctx.seed % 1000}-"
    pool = Pool(ctx.n(30))

    def cycle(i: int, kind: str) -> None:
        result = guarded(t, tr.churn_cycle, ctx.port, (i, kind), f"127.0.4.{i % 20 + 1}", prefix)
        t.connections += 2 if kind == "resume_reset" else 1
        if kind == "dead" and result is not None:
            t.errors["idle_timeout"] += 1

    i = 0
    while ctx.left() > IDLE_TIMEOUT + 2:
        pool.wait_available(timeout=10)
        kind = "dead" if ctx.rng.random() < 0.01 else ctx.rng.choice(CHURN_KINDS)
        pool.spawn(cycle, i, kind)
        i += 1
    if not pool.join(timeout=60):
        t.note("churn cycles still running after 60 s")
        pool.kill(timeout=5)
    t.waves += 1


def connection_flood(ctx: Ctx, t: Tally) -> None:
    """One address (127.0.0.50) opens 300 connections at once, over its max_conns_per_ip."""
    while ctx.left() > 4:
        results = run_wave(t, lambda _: tr.over_cap_attempt(ctx.port, "127.0.0.50"), list(range(300)), 300, 30)
        held = [r[2] for r in results if r is not None and r[2] is not None]
        for r in results:
            if r is None:
                continue
            t.connections += 1
            if r[0] != "welcome":
                t.errors[r[0]] += 1
                if r[1] > 2.0:  # measured here: includes this process waiting for CPU
                    t.note("a refusal took more than 2 s")
        gevent.sleep(1.0)  # hold the admitted ones a while: the cap stays reached
        for p in held:
            p.close()
        gevent.sleep(0.5)


def message_flood(ctx: Ctx, t: Tally) -> None:
    """Waves of 30 connections that send 400 requests at once (msgs or garbage lines): each
    must get rate_limited and, after max_strikes, be closed."""
    wave = 0
    while ctx.left() > 4:
        jobs = [(i, "msg" if i % 3 else "garbage") for i in range(ctx.n(30))]
        prefix = f"mf{ctx.seed % 1000}-{wave}-"
        results = run_wave(t, lambda job: tr.flooder(ctx.port, job, f"127.0.5.{job[0] % 5 + 1}", prefix),
                           jobs, 30, 30)
        for r in results:
            if r is None:
                continue
            acks, limited, end = r
            t.connections += 1
            t.errors["rate_limited"] += len(limited)
            if end != "closed":
                t.note("a flooder was not disconnected")
        wave += 1
        gevent.sleep(0.5)


PONG_FLOOD_MB = 20
PROBE_LIMIT = 1.0  # a round trip, seen by a process that shares 2 CPUs with the server and every attack


def pong_flood(ctx: Ctx, t: Tally) -> None:
    """Waves: two processes of their own (the tests' FLOOD_PROGRAM) send 20 MB of pongs each
    (no token, no reply: as fast as loopback takes them) while a probe pings every 0.1 s.
    No probe round trip may take longer than 1 s (2.4 s on a server whose readers do not
    yield, FAIR_SHARE in conn.py), and each flooder must get its hello answered and send
    everything."""
    wave = 0
    while ctx.left() > 4:
        prefix = f"pf{ctx.seed % 1000}-{wave}"
        probe = prober = None
        flooders: list = []
        done = Event()
        worst = [0.0]

        def probing(peer: tr.Peer) -> None:
            k = 0
            while not done.is_set():
                started = time.monotonic()
                peer.send({"type": "ping", "id": f"p{k}"})
                peer.expect("pong", timeout=10, id=f"p{k}")
                worst[0] = max(worst[0], time.monotonic() - started)
                k += 1
                gevent.sleep(0.1)

        try:
            probe = tr.Peer(ctx.port, source="127.0.8.1")
            probe.hello(f"{prefix}-p")
            prober = gevent.spawn(guarded, t, probing, probe)
            flooders = [subprocess.Popen([sys.executable, "-c", tr.FLOOD_PROGRAM, str(ctx.port), str(PONG_FLOOD_MB),
                                          tr.PONG, f"{prefix}-f{k}", f"127.0.8.{k + 2}"]) for k in range(2)]
            t.connections += 1 + len(flooders)
            for proc in flooders:
                if proc.wait(timeout=120) != 0:
                    t.note(f"a pong flooder exited {proc.returncode}")
        except (Exception, gevent.Timeout) as exc:  # noqa: BLE001 - a note, then the next wave
            t.fail(exc)
        finally:
            done.set()
            for proc in flooders:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if prober is not None:
                prober.join(timeout=15)
            if probe is not None:
                probe.close()
        if worst[0] > PROBE_LIMIT:
            t.note(f"a ping took {worst[0]:.1f} s beside a pong flood")
        t.waves += 1
        wave += 1
        gevent.sleep(1.0)


def handler_faults(ctx: Ctx, t: Tally) -> None:
    """Waves of 60 connections whose handler raises (GOCHAT_TEST_FAULTS=1)."""
    wave = 0
    while ctx.left() > 3:
        prefix = f"hf{ctx.seed % 1000}-{wave}-"
        results = run_wave(t, lambda i: tr.faulty(ctx.port, i, f"127.0.6.{i % 5 + 1}", prefix),
                           list(range(ctx.n(60))), 30, 30)
        t.connections += len(results)
        wave += 1
        gevent.sleep(0.3)


def resume_storm(ctx: Ctx, t: Tally) -> None:
    """Acked means delivered: 6 members drop (FIN or RST) and resume at random while 2
    senders and a sender that itself drops and resends flood the room; every member must end
    with every acked message exactly once, in the order of PROTOCOL.md section 5."""
    cycle = 0
    while ctx.left() > 5:
        room = f"storm{ctx.seed % 1000}-{cycle}"
        rng = random.Random(ctx.seed * 1000 + cycle)
        members = [tr.FlakyMember(ctx.port, tr.unique_nick("sm"), room, random.Random(rng.random()), "127.0.7.1")
                   for _ in range(6)]
        senders: list[Client] = []
        acked: dict[int, tuple[str, str]] = {}
        stop = Event()
        try:
            for m in members:
                m.connect()
            senders = [Client("127.0.0.1", ctx.port, source="127.0.7.2") for _ in range(2)]
            for s in senders:
                s.hello(nick=tr.unique_nick("sd"))
                s.join(room)
            seconds = max(2.0, min(10.0, ctx.left() - 3))

            def steady_sender(client: Client) -> None:
                end = time.monotonic() + seconds
                k = 0
                while time.monotonic() < end:
                    rid = f"{client.nick}-{k}"
                    acked[client.send(room, rid, id=rid)["seq"]] = (client.nick, rid)
                    k += 1
                    gevent.sleep(1 / 40)

            flaky = [gevent.spawn(guarded, t, m.run, stop) for m in members]
            sending = [gevent.spawn(steady_sender, s) for s in senders]
            sending.append(gevent.spawn(tr.flaky_sender, ctx.port, int(seconds * 10), rng, acked, "127.0.7.3",
                                        tr.unique_nick("fs"), room))
            gevent.joinall(sending, timeout=seconds + 30)
            for g in sending:
                if g.exception is not None:
                    t.fail(g.exception)
            stop.set()
            gevent.joinall(flaky, timeout=10)
            last = max(acked, default=0)
            for m in members:
                try:
                    m.catch_up(last)
                except (Exception, gevent.Timeout) as exc:  # noqa: BLE001
                    t.fail(exc)
                t.lost += sum(1 for seq in acked if seq not in m.messages)
                for seq, (sender, rid) in acked.items():
                    got = m.messages.get(seq)
                    if got is not None and (got["from"], got.get("id")) != (sender, rid):
                        t.note("a member got another message under an acked seq")
                t.connections += m.connections
            t.connections += len(senders) + 1
        except (Exception, gevent.Timeout) as exc:  # noqa: BLE001
            t.fail(exc)
        finally:
            stop.set()
            for s in senders:
                s.close()
            for m in members:
                if m.peer is not None:
                    m.peer.close()
        t.waves += 1
        cycle += 1


ATTACKS: dict[str, Callable[[Ctx, Tally], None]] = {
    "slowloris": slowloris,
    "garbage": garbage,
    "slow_consumers": slow_consumers,
    "churn": churn,
    "connection_flood": connection_flood,
    "message_flood": message_flood,
    "pong_flood": pong_flood,
    "handler_faults": handler_faults,
    "resume_storm": resume_storm,
}


def run_attack(name: str, attack: Callable[[Ctx, Tally], None], ctx: Ctx) -> dict:
    tally = Tally(name)
    try:
        attack(ctx, tally)
    except (Exception, gevent.Timeout) as exc:  # noqa: BLE001 - reported, with what was counted so far
        tally.fail(exc)
    cpu = sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                        resource.RUSAGE_CHILDREN)))
    return {**tally.as_dict(), "cpu_s": round(cpu, 2)}  # children: the pong flooders
