#!/usr/bin/env python3
"""Soak gochat: every attack of tests/test_robustness.py and the hostile clients of issue 11 at
volume against one server, while a steady chat load checks that no acked message is ever lost
and measures its ack latency.

    python scripts/soak.py --minutes 5                          # the documented run (docs/robustness.md)
    python scripts/soak.py --minutes 1                          # a quick look
    python scripts/soak.py --minutes 1 --attacks room_flood     # one attack (or a comma-separated few)

It starts its own server (``python -m gochat serve`` on 127.0.0.1, soaklib.SETTINGS,
GOCHAT_TEST_FAULTS=1), a second one over TLS for the silent TLS sockets (soaklib.TLS_SETTINGS,
a self-signed certificate made at start), and a steady chat load (4 rooms, 2 senders and 3
readers each, 5 messages/s per sender; readers and senders resume when dropped). Then:

1. a quiet window: no attack; the steady load's ack latency there is the reference (another
   quiet window at the end shows what the attacks left behind);
2. each attack alone for a slice of the time, in worker processes of its own, then the
   server is left to settle (every attack connection closed, every session expired, open
   files and greenlets back to the baseline);
3. the hostile clients of issue 11 at once, then every attack at once (each in its own
   workers, at half their waves but the silent TLS sockets), settling after each;
4. the steady load stops, its readers catch up, and the table is printed: per phase, the
   connections opened, the errors the server answered, the steady load's ack p50/p99, the
   slowest /health answer (probed every 0.25 s), the server's RSS before / peak / after, open
   files and greenlets before / after, the most rooms /stats counted (sampled every second),
   and the messages lost (acked but never delivered to a reader: must be 0).

Beside the attacks' own checks, each phase of the issue-11 attacks must keep the steady load's
ack p99 within 2x of the first quiet window's and /health under 1 s; every phase must leave open
files and greenlets back at the baseline and /stats rooms at most max_rooms; the history hammer
alone must keep RSS within the bound it reports.

The attacks use their own source addresses (127.0.1.x ... 127.0.12.x; the connection flood
127.0.0.50) so that max_conns_per_ip only bites where it is the point. Every process this
script starts is stopped by its PID on exit (and dies with it: PR_SET_PDEATHSIG). The exit
status is 1 if a message was lost or a check failed, else 0.
"""
from __future__ import annotations

import sys

if "--worker" in sys.argv:  # worker processes are gevent programs: patch before anything else
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from soaklib import SETTINGS, TLS_SETTINGS  # noqa: E402
# The hostile clients of issue 11 (soaklib/hostile.py): within their limits, each must leave the
# steady load's ack p99 within LATENCY_FACTOR of the first quiet window's and /health under HEALTH_LIMIT.
HOSTILE = ["room_flood", "history_hammer", "dm_flood", "silent_tls"]
ATTACK_ORDER = ["slowloris", "garbage", "slow_consumers", "churn", "connection_flood", "message_flood",
                "pong_flood", "handler_faults", "resume_storm"] + HOSTILE
ATTACK_PROCESSES = {"room_flood": 2}  # attacks that one gevent process cannot drive fast enough
SOLO_WEIGHTS = {"room_flood": 2.0}  # its first 5 s go to holding rooms, before its churn can pass max_rooms
TOGETHER_SCALE = 0.5  # every attack at once, at half its waves: 2 CPUs run the server and 10 load processes
SETTLE_TIMEOUT = 30.0  # resume_window + idle_timeout + lingering closes, with room to spare
RECOVER_TIMEOUT = 10.0  # open files and greenlets back to the baseline after the settle
LATENCY_FACTOR = 2.0
HEALTH_LIMIT = 1.0  # seconds for a /health answer, seen from a thread of this process
HEALTH_INTERVAL = 0.25
HEALTH_TIMEOUT = 5.0  # a probe that gets no answer by then counts as this long, and as unanswered
PRIORITY = -5  # --priority: the nice value of the servers and the steady load; attacks stay at 0


# ---------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when this script dies, however it dies."""
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Children:
    def __init__(self, priority: int = 0) -> None:
        self.procs: list[subprocess.Popen] = []
        self.priority = priority  # the nice value of the servers and the steady load (--priority)

    def start(self, argv: list[str], prioritized: bool = False, **kwargs: Any) -> subprocess.Popen:
        def prepare() -> None:
            _die_with_parent()
            if prioritized and self.priority:
                os.setpriority(os.PRIO_PROCESS, 0, self.priority)

        proc = subprocess.Popen(argv, preexec_fn=prepare, cwd=ROOT, **kwargs)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A gochat process of the soak: its log is read by a thread that counts what matters."""

    def __init__(self, children: Children, settings: dict, name: str = "server") -> None:
        self.port, self.admin_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GOCHAT_")}
        env["GOCHAT_TEST_FAULTS"] = "1"
        argv = [sys.executable, "-m", "gochat", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--admin-port", str(self.admin_port), "--log-level", "info"]
        for key, value in settings.items():
            argv += ["--" + key.replace("_", "-"), str(value)]
        self.argv = argv
        self.proc = children.start(argv, prioritized=True, env=env, stderr=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, text=True, bufsize=1)
        self.counts: Counter = Counter()
        self.exceptions: Counter = Counter()
        self.tail: list[str] = []
        self.log_path = Path(tempfile.gettempdir()) / f"gochat-soak-{name}-{os.getpid()}.log"
        self.log = open(self.log_path, "w")  # the whole server log, for a post-mortem
        self.ready = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self.ready.wait(20):
            raise SystemExit("server did not start:\n" + "".join(self.tail))

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.write(line)
            if "gochat listening on" in line:
                self.ready.set()
            if line.startswith("Traceback"):
                self.counts["tracebacks"] += 1
            if "Too many open files" in line:
                self.counts["EMFILE"] += 1
            if " WARNING " in line or " ERROR " in line or " CRITICAL " in line:
                self.counts[line.split()[2]] += 1
            if re.match(r"[A-Za-z_.]+(Error|Exception): ", line):  # the last line of a traceback
                self.exceptions[line.strip()[:120]] += 1
            self.tail = (self.tail + [line])[-50:]
        self.log.close()
        self.ready.set()

    def get(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if path == "/stats" else body.decode()

    def stats(self, patience: float = 120.0) -> dict:
        """/stats, waiting out a server too busy to answer (an attack that freezes it is a finding, not a crash)."""
        deadline = time.monotonic() + patience
        while True:
            try:
                return self.get("/stats")
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Sampler(threading.Thread):
    """/stats every second, for the peaks, and the server's CPU time (read from /proc, so
    that it is known even while the server is too busy to answer)."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.samples: list[tuple[float, dict]] = []
        self.cpu: list[tuple[float, float]] = []  # (monotonic time, the server's CPU seconds)
        self.running = True

    def run(self) -> None:
        while self.running:
            self.cpu.append((time.monotonic(), cpu_seconds(self.server.proc.pid)))
            try:
                self.samples.append((time.monotonic(), self.server.get("/stats")))
            except OSError:
                pass
            time.sleep(1.0)

    def peak(self, key: str, start: float, end: float) -> int:
        return max((s[key] for t, s in self.samples if start <= t <= end), default=0)

    def cpu_share(self, start: float, end: float) -> float:
        """The server's CPU use between two times, in cores (1.0: one CPU all the time)."""
        inside = [(t, c) for t, c in self.cpu if start <= t <= end]
        if len(inside) < 2:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / max(1e-6, inside[-1][0] - inside[0][0])


class HealthProbe(threading.Thread):
    """GET /health every HEALTH_INTERVAL: how long the server's event loop takes to answer."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.samples: list[tuple[float, float, bool]] = []  # (wall time, seconds, answered)
        self.running = True

    def run(self) -> None:
        while self.running:
            sent_at, started = time.time(), time.monotonic()
            try:
                self.server.get("/health", timeout=HEALTH_TIMEOUT)
                answered = True
            except OSError:
                answered = False
            self.samples.append((sent_at, time.monotonic() - started, answered))
            time.sleep(max(0.0, HEALTH_INTERVAL - (time.monotonic() - started)))

    def window(self, w0: float, w1: float) -> tuple[float, int, int]:
        """(slowest answer in seconds, probes, probes unanswered) of the probes sent in [w0, w1)."""
        inside = [(s, ok) for t, s, ok in self.samples if w0 <= t < w1]
        return max((s for s, _ in inside), default=0.0), len(inside), sum(1 for _, ok in inside if not ok)


def worker_argv(name: str, server: Server, tls: tuple[Server, str] | None, seconds: float, seed: int,
                scale: float, part: int) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--port", str(server.port),
            "--seconds", f"{seconds:.1f}", "--seed", str(seed), "--scale", str(scale), "--part", str(part)]
    if tls is not None:
        argv += ["--tls-port", str(tls[0].port), "--tls-cert", tls[1]]
    return argv


def merge(name: str, parts: list[dict]) -> dict:
    """One attack's tallies from its processes: counts add up, "max ..." figures take the largest."""
    figures: dict[str, Any] = {}
    for part in parts:
        for key, value in part.get("figures", {}).items():
            if key not in figures or not isinstance(value, (int, float)) or not isinstance(figures[key], (int, float)):
                figures.setdefault(key, value)
            elif key.startswith("max "):
                figures[key] = max(figures[key], value)
            else:
                figures[key] += value
    return {"attack": name, "connections": sum(p["connections"] for p in parts),
            "errors": dict(sum((Counter(p["errors"]) for p in parts), Counter())),
            "lost": sum(p["lost"] for p in parts), "notes": dict(sum((Counter(p["notes"]) for p in parts), Counter())),
            "figures": figures, "cpu_s": sum(p.get("cpu_s", 0.0) for p in parts)}


def run_attacks(children: Children, server: Server, tls: tuple[Server, str] | None, names: list[str],
                seconds: float, seed: int, scale: float = 1.0) -> list[dict]:
    procs = [(name, children.start(worker_argv(name, server, tls, seconds, seed + i, scale, part),
                                   stdout=subprocess.PIPE, text=True))
             for i, name in enumerate(names) for part in range(ATTACK_PROCESSES.get(name, 1))]
    parts: dict[str, list[dict]] = {name: [] for name in names}
    for name, proc in procs:
        try:
            out, _ = proc.communicate(timeout=seconds + 120)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            parts[name].append(json.loads(lines[-1]) if lines else
                               {"connections": 0, "errors": {}, "lost": 0,
                                "notes": {f"worker exited {proc.returncode} without a result": 1}})
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            parts[name].append({"connections": 0, "errors": {}, "lost": 0,
                                "notes": {"worker killed: it overran its time": 1}})
    return [merge(name, parts[name]) for name in names]


def settle(server: Server, baseline: dict) -> tuple[dict, bool]:
    """Wait until the attack's connections and sessions are all gone (bounded); the /stats then.

    Polled, because "every session whose resume_window passed has expired" has no event a
    client could wait for."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        now = server.stats()
        if (now["connections"], now["sessions"], now["sessions_awaiting_resume"]) == (
                baseline["connections"], baseline["sessions"], baseline["sessions_awaiting_resume"]):
            return now, True
        if time.monotonic() > deadline:
            return now, False
        time.sleep(0.25)


def recover(server: Server, baseline: dict) -> tuple[dict, bool]:
    """Wait (bounded) until open files and greenlets are back at the baseline; the /stats then.

    Polled: an admin request of this script's own threads may hold a descriptor and a
    greenlet for a moment."""
    deadline = time.monotonic() + RECOVER_TIMEOUT
    while True:
        now = server.stats()
        if now["open_files"] <= baseline["open_files"] and now["greenlets"] <= baseline["greenlets"]:
            return now, True
        if time.monotonic() > deadline:
            return now, False
        time.sleep(0.25)


# ---------------------------------------------------------------- the report


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def errors_cell(errors: dict) -> str:
    total = sum(errors.values())
    top = sorted(errors.items(), key=lambda kv: -kv[1])[:2]
    return f"{total}" + (f" ({', '.join(f'{k} {v}' for k, v in top)}{', ...' if len(errors) > 2 else ''})"
                         if top else "")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def health_cell(row: dict) -> str:
    worst, probes, unanswered = row["health"]
    return f"{worst * 1000:.0f}" + (f" ({unanswered} of {probes} unanswered in {HEALTH_TIMEOUT:g} s)"
                                     if unanswered else "")


def table(rows: list[dict]) -> str:
    head = ["phase", "connections", "errors returned", "ack p50 / p99 ms", "/health max ms",
            "RSS MiB before/peak/after", "fds before/after", "greenlets before/after", "rooms max", "lost"]
    cells = [[r["attack"], str(r["connections"]), errors_cell(r["errors"]),
              f"{r['ack'][0]:.1f} / {r['ack'][1]:.1f} ({r['ack'][2]})", health_cell(r),
              f"{mib(r['before']['rss_bytes'])} / {mib(r['peak_rss'])} / {mib(r['after']['rss_bytes'])}",
              f"{r['before']['open_files']} / {r['after']['open_files']}",
              f"{r['before']['greenlets']} / {r['after']['greenlets']}", str(r["peak_rooms"]), str(r["lost"])]
             for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(c) for c in cells])


def phases(selected: list[str]) -> list[tuple[str, list[str], float]]:
    """The phases after the solo runs: (name, attacks, scale of the older attacks' waves)."""
    groups = [("issue-11 attacks at once", [a for a in HOSTILE if a in selected], 1.0),
              ("all at once", selected, TOGETHER_SCALE)]
    out: list[tuple[str, list[str], float]] = []
    for name, attacks, scale in groups:
        if len(attacks) >= 2 and all(attacks != o[1] for o in out):
            out.append((name, attacks, scale))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="total run time (default 5)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--attacks", default=",".join(ATTACK_ORDER),
                        help="comma-separated attacks to run, alone then together (default: all): "
                             + ", ".join(ATTACK_ORDER))
    parser.add_argument("--server-option", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of soaklib.SETTINGS for both servers (repeatable), "
                             "e.g. max_rooms=1000000")
    parser.add_argument("--priority", action="store_true",
                        help=f"run the servers and the steady load at nice {PRIORITY} (root only): on a machine "
                             "shared with other work, the server gets its CPU first, as on a machine of its own")
    args = parser.parse_args()
    overrides = dict(option.split("=", 1) for option in args.server_option)
    selected = [a for a in ATTACK_ORDER if a in args.attacks.split(",")]
    unknown = set(args.attacks.split(",")) - set(ATTACK_ORDER)
    if unknown or not selected:
        parser.error(f"unknown attacks {sorted(unknown)}; choose from {', '.join(ATTACK_ORDER)}")
    together_phases = phases(selected)
    total = args.minutes * 60
    quiet = max(10.0, 0.05 * total)  # the steady load alone: its ack latency is the reference
    # each attack alone (plus the time the server takes to settle), some for longer
    solo = max(8.0, 0.45 * total / sum(SOLO_WEIGHTS.get(a, 1.0) for a in selected))
    together = max(15.0, 0.25 * total / max(1, len(together_phases)))  # each phase of attacks at once
    children = Children(PRIORITY if args.priority else 0)
    started = time.monotonic()
    load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    certdir = tempfile.TemporaryDirectory(prefix="gochat-soak-")
    try:
        server = Server(children, {**SETTINGS, **overrides})
        tls = None
        if "silent_tls" in selected:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import make_certificate  # the tests' self-signed certificate

            cert, key = make_certificate(Path(certdir.name))
            tls = (Server(children, {**TLS_SETTINGS, **overrides, "tls_cert": cert, "tls_key": key}, "tls-server"),
                   cert)
        sampler = Sampler(server)
        sampler.start()
        tls_sampler = Sampler(tls[0]) if tls else None
        if tls_sampler:
            tls_sampler.start()
        health = HealthProbe(server)
        health.start()
        steady = children.start([sys.executable, str(Path(__file__).resolve()), "--worker", "steady", "--port",
                                 str(server.port)], prioritized=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, bufsize=1)
        if steady.stdout.readline().strip() != "ready":
            raise SystemExit("the steady chat load did not start")
        time.sleep(2.0)  # a few seconds of steady chat before the baseline (its sessions, its greenlets)
        rows: list[dict] = []

        def quiet_window(name: str) -> dict:
            before, m0, w0 = server.stats(), time.monotonic(), time.time()
            time.sleep(quiet)
            rows.append({"attack": name, "attacks": [], "connections": 0, "errors": {}, "lost": 0, "notes": {},
                         "figures": {}, "before": before, "after": server.stats(), "settled": True,
                         "recovered": True, "w": (w0, time.time(), time.time()), "m": (m0, time.monotonic()),
                         "m_attack": time.monotonic(), "attack_cpu": 0.0})
            print(f"[{time.monotonic() - started:6.0f} s] {name}: {quiet:.0f} s of steady chat alone", flush=True)
            return rows[-1]["after"]

        baseline = quiet_window("no attack (first)")
        tls_baseline = tls[0].stats() if tls else None
        plan = ([(name, [name], solo * SOLO_WEIGHTS.get(name, 1.0), 1.0) for name in selected]
                + [(n, a, together, sc) for n, a, sc in together_phases])
        for i, (name, attacks, seconds, scale) in enumerate(plan):
            on_tls = attacks == ["silent_tls"]  # the TLS server is its target: its stats make the row
            target = tls[0] if on_tls else server
            before, m0, w0 = target.stats(), time.monotonic(), time.time()
            results = run_attacks(children, server, tls, attacks, seconds, args.seed * 100 + i * 10, scale)
            w_attack, m_attack = time.time(), time.monotonic()
            after, settled = settle(target, tls_baseline if on_tls else baseline)
            after, recovered = recover(target, tls_baseline if on_tls else baseline)
            notes = sum((Counter(r["notes"]) for r in results), Counter())
            if tls and "silent_tls" in attacks and not on_tls:
                tls_after, tls_settled = settle(tls[0], tls_baseline)
                tls_after, tls_recovered = recover(tls[0], tls_baseline)
                if not (tls_settled and tls_recovered):
                    notes[f"the TLS server did not return to its baseline (connections {tls_after['connections']}, "
                          f"open files {tls_after['open_files']}, greenlets {tls_after['greenlets']})"] += 1
            m1 = time.monotonic()
            row_sampler = tls_sampler if on_tls else sampler
            rows.append({"attack": name + (" (TLS server)" if on_tls else ""), "attacks": attacks,
                         "connections": sum(r["connections"] for r in results),
                         "errors": dict(sum((Counter(r["errors"]) for r in results), Counter())),
                         "lost": sum(r["lost"] for r in results), "notes": dict(notes),
                         "figures": {r["attack"]: r["figures"] for r in results if r["figures"]},
                         "before": before, "after": after, "settled": settled, "recovered": recovered,
                         "w": (w0, w_attack, time.time()), "m": (m0, m1), "m_attack": m_attack,
                         "attack_cpu": sum(r["cpu_s"] for r in results),
                         "peak_rss": max(row_sampler.peak("rss_bytes", m0, m1), before["rss_bytes"],
                                         after["rss_bytes"])})
            print(f"[{time.monotonic() - started:6.0f} s] {name}: {rows[-1]['connections']} connections, "
                  f"{sum(rows[-1]['errors'].values())} errors, settled={settled}, recovered={recovered}", flush=True)
        quiet_window("no attack (last)")
        steady.stdin.write("finish\n")
        steady.stdin.flush()
        steady_result = json.loads(steady.stdout.readline())
        sampler.running = health.running = False
        if tls_sampler:
            tls_sampler.running = False
        final = server.stats()
        metrics_text = server.get("/metrics")
        servers = [server] + ([tls[0]] if tls else [])
        for s in servers:
            s.proc.send_signal(signal.SIGTERM)
        exit_codes = []
        for s in servers:
            try:
                exit_codes.append(s.proc.wait(30))
            except subprocess.TimeoutExpired:
                exit_codes.append(None)
    finally:
        children.stop_all()
        certdir.cleanup()

    acks = steady_result["acks"]  # [send time, ms]
    max_rooms = int({**SETTINGS, **overrides}["max_rooms"])
    for row in rows:
        w0, w_attack, w1 = row["w"]
        m0, m1 = row["m"]
        latencies = [ms for t, ms in acks if w0 <= t < w_attack]
        row["ack"] = (percentile(latencies, 0.5), percentile(latencies, 0.99), len(latencies))
        row["health"] = health.window(w0, w_attack)
        row["peak_rooms"] = sampler.peak("rooms", m0, m1)
        row.setdefault("peak_rss", max(sampler.peak("rss_bytes", m0, m1), row["before"]["rss_bytes"]))
        # messages of the steady load that some reader never got, by the window they were acked in
        row["lost"] += sum(1 for _, _, t in steady_result["missing"] if w0 <= t < w1)
    unattributed = sum(1 for _, _, t in steady_result["missing"] if not any(w0 <= t < w1 for w0, _, w1 in
                                                                             (r["w"] for r in rows)))
    # The reference: the first quiet window, the server fresh. Not the last one too: one stall
    # there (a full collection of a heap the attacks grew, another process on these CPUs)
    # delays all 8 senders' acks at once, more than 1% of the window's samples.
    reference = rows[0]["ack"][1]
    steady_row = {"attack": "steady chat (whole run)", "connections": 20, "errors": {},
                  "lost": len(steady_result["missing"]), "before": rows[0]["before"], "after": final,
                  "peak_rss": max(s["rss_bytes"] for _, s in sampler.samples),
                  "ack": (percentile([ms for _, ms in acks], 0.5), percentile([ms for _, ms in acks], 0.99), len(acks)),
                  "health": health.window(0, float("inf")), "peak_rooms": sampler.peak("rooms", 0, float("inf"))}
    print()
    print(f"gochat soak: {args.minutes:g} min on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"seed {args.seed}, load average at the start {load_at_start}, at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes share the CPUs)")
    print("server: " + " ".join(server.argv[3:]) + "  (GOCHAT_TEST_FAULTS=1)"
          + (f"; the servers and the steady load at nice {PRIORITY}" if args.priority else ""))
    if tls:
        print("TLS server: " + " ".join(tls[0].argv[3:]))
    longer = ", ".join(f"{a} {solo * w:.0f} s" for a, w in SOLO_WEIGHTS.items() if a in selected)
    print(f"a quiet window of {quiet:.0f} s, each attack alone for {solo:.0f} s"
          + (f" ({longer})" if longer else "") + ", then "
          + (", ".join(f"{n} ({len(a)} attacks) for {together:.0f} s" for n, a, _ in together_phases) or "nothing")
          + f" (waves at {TOGETHER_SCALE:g}x in all at once), another quiet window; "
          f"the steady load ran throughout")
    print()
    print(table(rows + [steady_row]))
    print()
    print("ack p50 / p99: the steady load's senders, send to ack (resends included), for the msgs sent while the "
          "attack ran (their count in brackets); /health max: the slowest of the probes sent meanwhile")
    for row in rows:
        m0, m_attack = row["m"][0], row["m_attack"]
        print(f"{row['attack']}: server CPU {sampler.cpu_share(m0, m_attack):.2f} cores"
              + (f", TLS server CPU {tls_sampler.cpu_share(m0, m_attack):.2f} cores" if tls_sampler else "")
              + f", attack processes {row['attack_cpu']:.1f} CPU-s in {m_attack - m0:.0f} s")
        for attack, figures in row.get("figures", {}).items():
            print(f"    {attack}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    acked = len(steady_result["acked"])
    lat = steady_result["latency_ms"]
    print(f"steady chat: {acked} messages acked, {len(steady_result['missing'])} lost, "
          f"{steady_result['duplicates']} duplicates, {steady_result['order_errors']} out of order; "
          f"delivery latency p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms; "
          f"reader reconnects {steady_result['reader_drops']}, sender reconnects {steady_result['sender_drops']}, "
          f"expired sessions {steady_result['expired']}")
    closes = {m.group(1): float(m.group(2)) for m in
              re.finditer(r'gochat_connections_closed_total\{reason="(\w+)"\} ([\d.e+]+)', metrics_text)}
    rejected = {m.group(1): float(m.group(2)) for m in
                re.finditer(r'gochat_connections_rejected_total\{reason="(\w+)"\} ([\d.e+]+)', metrics_text)}
    samples_path = server.log_path.with_suffix(".stats.json")
    samples_path.write_text(json.dumps([{"t": round(t - started, 1), **s} for t, s in sampler.samples]))
    acks_path = server.log_path.with_suffix(".acks.json")  # for a closer look: latency against time
    acks_path.write_text(json.dumps({"acks": acks, "health": health.samples,
                                     "phases": [[r["attack"], *r["w"]] for r in rows]}))
    print("server closes by reason: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(closes.items())))
    print("server refusals: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rejected.items())))
    for s, code in zip(servers, exit_codes):
        print(f"{s.log_path.name}: {dict(s.counts)}; exit status after SIGTERM: {code}")
    print(f"(server logs in {server.log_path.parent}, /stats samples in {samples_path}, acks and /health in "
          f"{acks_path})")
    problems = []
    for row in rows:
        if not row["attacks"]:
            continue
        if not row["settled"]:
            problems.append(f"{row['attack']}: the server did not return to the baseline's connections and "
                            f"sessions within {SETTLE_TIMEOUT:.0f} s")
        if not row["recovered"]:
            problems.append(f"{row['attack']}: open files {row['after']['open_files']} and greenlets "
                            f"{row['after']['greenlets']} not back to the baseline's "
                            f"({row['before']['open_files']}, {row['before']['greenlets']}) within "
                            f"{RECOVER_TIMEOUT:.0f} s of settling")
        if row["peak_rooms"] > max_rooms:
            problems.append(f"{row['attack']}: /stats counted {row['peak_rooms']} rooms, over max_rooms {max_rooms}")
        if set(row["attacks"]) <= set(HOSTILE):
            if row["ack"][1] > LATENCY_FACTOR * reference:
                problems.append(f"{row['attack']}: the steady load's ack p99 {row['ack'][1]:.1f} ms is over "
                                f"{LATENCY_FACTOR:g}x the first quiet window's {reference:.1f} ms")
            if row["health"][0] > HEALTH_LIMIT:
                problems.append(f"{row['attack']}: /health took {health_cell(row)} ms (limit "
                                f"{HEALTH_LIMIT * 1000:.0f} ms)")
        hammer = row.get("figures", {}).get("history_hammer", {})
        if row["attacks"] == ["history_hammer"] and "rss growth allowed MiB" in hammer:
            growth = (row["peak_rss"] - row["before"]["rss_bytes"]) / 2**20
            if growth > hammer["rss growth allowed MiB"]:
                problems.append(f"history_hammer: RSS grew {growth:.0f} MiB, over the "
                                f"{hammer['rss growth allowed MiB']:.0f} MiB bound")
        notes = sorted(row.get("notes", {}).items(), key=lambda kv: -kv[1])
        for note, count in notes[:20]:
            problems.append(f"{row['attack']}: {note} (x{count})")
        if len(notes) > 20:
            problems.append(f"{row['attack']}: ... and {len(notes) - 20} more kinds of failed check")
    if unattributed:
        problems.append(f"{unattributed} lost messages acked outside every window")
    if steady_result["duplicates"] or steady_result["order_errors"]:
        problems.append("steady chat: duplicates or out-of-order deliveries")
    for s in servers:
        for exception, count in sorted(s.exceptions.items()):
            if exception != "RuntimeError: fault injected by test_fault":
                problems.append(f"{s.log_path.name}: {count} handler tracebacks ending in {exception!r}")
    print()
    print("checks that failed:" if problems else "checks that failed: none")
    for p in problems:
        print("  - " + p)
    lost = sum(r["lost"] for r in rows) + steady_row["lost"]
    return 1 if lost or problems or any(code != 0 for code in exit_codes) else 0


def worker() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--tls-port", type=int, default=0)
    parser.add_argument("--tls-cert", default="")
    args = parser.parse_args()
    if args.worker == "steady":
        from soaklib.steady import run_steady

        run_steady(args.port)
        return 0
    from soaklib.attacks import ATTACKS, Ctx, run_attack
    from soaklib.hostile import HOSTILE as HOSTILE_ATTACKS

    ctx = Ctx(args.port, args.seconds, args.seed, args.scale, args.part, args.tls_port, args.tls_cert)
    attack = {**ATTACKS, **HOSTILE_ATTACKS}[args.worker]
    print(json.dumps(run_attack(args.worker, attack, ctx)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker() if "--worker" in sys.argv else main())
