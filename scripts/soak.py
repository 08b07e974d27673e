#!/usr/bin/env python3
"""Soak gochat: every attack of tests/test_robustness.py at volume against one server,
while a steady chat load checks that no acked message is ever lost.

    python scripts/soak.py --minutes 5          # the documented run (docs/robustness.md)
    python scripts/soak.py --minutes 1          # a quick look

It starts its own server (``python -m gochat serve`` on 127.0.0.1, soaklib.SETTINGS,
GOCHAT_TEST_FAULTS=1) and a steady chat load (4 rooms, 2 senders and 3 readers each, 5
messages/s per sender; readers and senders resume when dropped). Then:

1. each attack alone for a slice of the time, in a worker process of its own, then the
   server is left to settle (every attack connection closed, every session expired);
2. every attack at once, each in its own worker process, then settle again;
3. the steady load stops, its readers catch up, and the table is printed: per attack, the
   connections it opened, the errors the server answered, the server's RSS before / peak /
   after, open files and greenlets before / after (from /stats, sampled every second), and
   the messages lost (acked but never delivered to a reader: must be 0).

The attacks use their own source addresses (127.0.1.x ... 127.0.8.x; the connection flood
127.0.0.50) so that max_conns_per_ip only bites where it is the point. Every process this
script starts is stopped by its PID on exit (and dies with it: PR_SET_PDEATHSIG). The exit
status is 1 if a message was lost or the server failed a check, else 0.
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
from soaklib import SETTINGS  # noqa: E402
ATTACK_ORDER = ["slowloris", "garbage", "slow_consumers", "churn", "connection_flood", "message_flood",
                "pong_flood", "handler_faults", "resume_storm"]
TOGETHER_SCALE = 0.5  # every attack at once, at half its waves: 2 CPUs run the server and 10 load processes
SETTLE_TIMEOUT = 30.0  # resume_window + idle_timeout + lingering closes, with room to spare


# ---------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when this script dies, however it dies."""
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Children:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(argv, preexec_fn=_die_with_parent, cwd=ROOT, **kwargs)
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
    """The soak's gochat process: its log is read by a thread that counts what matters."""

    def __init__(self, children: Children) -> None:
        self.port, self.admin_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GOCHAT_")}
        env["GOCHAT_TEST_FAULTS"] = "1"
        argv = [sys.executable, "-m", "gochat", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--admin-port", str(self.admin_port), "--log-level", "info"]
        for key, value in SETTINGS.items():
            argv += ["--" + key.replace("_", "-"), str(value)]
        self.argv = argv
        self.proc = children.start(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                   bufsize=1)
        self.counts: Counter = Counter()
        self.exceptions: Counter = Counter()
        self.tail: list[str] = []
        self.log_path = Path(tempfile.gettempdir()) / f"gochat-soak-server-{os.getpid()}.log"
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

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10) as r:
            body = r.read()
        return json.loads(body) if path == "/stats" else body.decode()


class Sampler(threading.Thread):
    """/stats every second, for the peaks."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.samples: list[tuple[float, dict]] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                self.samples.append((time.monotonic(), self.server.get("/stats")))
            except OSError:
                pass
            time.sleep(1.0)

    def peak(self, key: str, start: float, end: float) -> int:
        return max((s[key] for t, s in self.samples if start <= t <= end), default=0)


def worker_argv(name: str, server: Server, seconds: float, seed: int, scale: float) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--port", str(server.port),
            "--seconds", f"{seconds:.1f}", "--seed", str(seed), "--scale", str(scale)]


def run_attacks(children: Children, server: Server, names: list[str], seconds: float, seed: int,
                scale: float = 1.0) -> list[dict]:
    procs = [(name, children.start(worker_argv(name, server, seconds, seed + i, scale), stdout=subprocess.PIPE,
                                   text=True)) for i, name in enumerate(names)]
    results = []
    for name, proc in procs:
        try:
            out, _ = proc.communicate(timeout=seconds + 120)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else
                           {"attack": name, "connections": 0, "errors": {}, "lost": 0,
                            "notes": {f"worker exited {proc.returncode} without a result": 1}})
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            results.append({"attack": name, "connections": 0, "errors": {}, "lost": 0,
                            "notes": {"worker killed: it overran its time": 1}})
    return results


def settle(server: Server, baseline: dict) -> tuple[dict, bool]:
    """Wait until the attack's connections and sessions are all gone (bounded); the /stats then.

    Polled, because "every session whose resume_window passed has expired" has no event a
    client could wait for."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        now = server.get("/stats")
        if (now["connections"], now["sessions"], now["sessions_awaiting_resume"]) == (
                baseline["connections"], baseline["sessions"], baseline["sessions_awaiting_resume"]):
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


def table(rows: list[dict]) -> str:
    head = ["attack", "connections", "errors returned", "RSS MiB before/peak/after", "fds before/after",
            "greenlets before/after", "lost"]
    cells = [[r["attack"], str(r["connections"]), errors_cell(r["errors"]),
              f"{mib(r['before']['rss_bytes'])} / {mib(r['peak_rss'])} / {mib(r['after']['rss_bytes'])}",
              f"{r['before']['open_files']} / {r['after']['open_files']}",
              f"{r['before']['greenlets']} / {r['after']['greenlets']}", str(r["lost"])] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(c) for c in cells])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="total run time (default 5)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    total = args.minutes * 60
    solo = max(8.0, 0.06 * total)  # each attack alone (plus the time the server takes to settle)
    together = max(15.0, 0.4 * total)  # every attack at once
    children = Children()
    started = time.monotonic()
    try:
        server = Server(children)
        sampler = Sampler(server)
        sampler.start()
        steady = children.start([sys.executable, str(Path(__file__).resolve()), "--worker", "steady", "--port",
                                 str(server.port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                bufsize=1)
        if steady.stdout.readline().strip() != "ready":
            raise SystemExit("the steady chat load did not start")
        time.sleep(2.0)  # a few seconds of steady chat before the baseline (its sessions, its greenlets)
        baseline = settle(server, server.get("/stats"))[0]
        rows, windows = [], []
        for i, name in enumerate(ATTACK_ORDER):
            before = server.get("/stats")
            t0 = time.monotonic()
            result = run_attacks(children, server, [name], solo, args.seed * 100 + i * 10)[0]
            after, settled = settle(server, baseline)
            t1 = time.monotonic()
            windows.append((name, time.time() - (t1 - t0), time.time()))
            rows.append({**result, "before": before, "after": after, "settled": settled,
                         "peak_rss": max(sampler.peak("rss_bytes", t0, t1), before["rss_bytes"], after["rss_bytes"])})
            print(f"[{time.monotonic() - started:6.0f} s] {name}: {result['connections']} connections, "
                  f"{sum(result['errors'].values())} errors, settled={settled}", flush=True)
        before = server.get("/stats")
        t0 = time.monotonic()
        results = run_attacks(children, server, ATTACK_ORDER, together, args.seed * 100 + 90, TOGETHER_SCALE)
        after, settled = settle(server, baseline)
        t1 = time.monotonic()
        windows.append(("all at once", time.time() - (t1 - t0), time.time()))
        trend = [max((s["rss_bytes"] for t, s in sampler.samples if t <= t0 + (t1 - t0) * q), default=0)
                 for q in (0.1, 0.25, 0.5, 0.75, 1.0)]
        combined = {"attack": "all at once", "connections": sum(r["connections"] for r in results),
                    "errors": sum((Counter(r["errors"]) for r in results), Counter()),
                    "lost": sum(r["lost"] for r in results),
                    "notes": sum((Counter(r["notes"]) for r in results), Counter())}
        rows.append({**combined, "before": before, "after": after, "settled": settled,
                     "peak_rss": max(sampler.peak("rss_bytes", t0, t1), before["rss_bytes"], after["rss_bytes"])})
        print(f"[{time.monotonic() - started:6.0f} s] all at once: {combined['connections']} connections, "
              f"settled={settled}", flush=True)
        steady.stdin.write("finish\n")
        steady.stdin.flush()
        steady_result = json.loads(steady.stdout.readline())
        sampler.running = False
        final = server.get("/stats")
        metrics_text = server.get("/metrics")
        server.proc.send_signal(signal.SIGTERM)
        try:
            exit_code = server.proc.wait(30)
        except subprocess.TimeoutExpired:
            exit_code = None
    finally:
        children.stop_all()

    # messages of the steady load that some reader never got, by the window they were acked in
    for row, (name, w0, w1) in zip(rows, windows):
        row["lost"] += sum(1 for _, _, t in steady_result["missing"] if w0 <= t < w1)
    unattributed = sum(1 for _, _, t in steady_result["missing"] if not any(w0 <= t < w1 for _, w0, w1 in windows))
    steady_row = {"attack": "steady chat (whole run)", "connections": 20, "errors": {},
                  "lost": len(steady_result["missing"]), "before": baseline, "after": final, "settled": True,
                  "peak_rss": max(s["rss_bytes"] for _, s in sampler.samples)}
    print()
    print(f"gochat soak: {args.minutes:g} min on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"seed {args.seed}")
    print("server: " + " ".join(server.argv[3:]) + "  (GOCHAT_TEST_FAULTS=1)")
    print(f"each attack alone for {solo:.0f} s, then all {len(ATTACK_ORDER)} at once for {together:.0f} s "
          f"(waves at {TOGETHER_SCALE:g}x); the steady load ran throughout")
    print()
    print(table(rows + [steady_row]))
    print()
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
    print("server RSS while every attack ran at once (highest so far, at 10/25/50/75/100% of the phase): "
          + " / ".join(f"{mib(r)} MiB" for r in trend))
    samples_path = server.log_path.with_suffix(".stats.json")
    samples_path.write_text(json.dumps([{"t": round(t - started, 1), **s} for t, s in sampler.samples]))
    print("server closes by reason: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(closes.items())))
    print("server refusals: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rejected.items())))
    print(f"server log: {dict(server.counts)}; exit status after SIGTERM: {exit_code}")
    print(f"(server log in {server.log_path}, /stats samples in {samples_path})")
    problems = []
    for row in rows:
        if not row["settled"]:
            problems.append(f"{row['attack']}: the server did not return to the baseline's connections and "
                            f"sessions within {SETTLE_TIMEOUT:.0f} s")
        notes = sorted(row.get("notes", {}).items(), key=lambda kv: -kv[1])
        for note, count in notes[:20]:
            problems.append(f"{row['attack']}: {note} (x{count})")
        if len(notes) > 20:
            problems.append(f"{row['attack']}: ... and {len(notes) - 20} more kinds of failed check")
    if unattributed:
        problems.append(f"{unattributed} lost messages acked outside every window")
    if steady_result["duplicates"] or steady_result["order_errors"]:
        problems.append("steady chat: duplicates or out-of-order deliveries")
    for exception, count in sorted(server.exceptions.items()):
        if exception != "RuntimeError: fault injected by test_fault":
            problems.append(f"server: {count} handler tracebacks ending in {exception!r}")
    print()
    print("checks that failed:" if problems else "checks that failed: none")
    for p in problems:
        print("  - " + p)
    lost = sum(r["lost"] for r in rows) + steady_row["lost"]
    return 1 if lost or problems or exit_code != 0 else 0


def worker() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    if args.worker == "steady":
        from soaklib.steady import run_steady

        run_steady(args.port)
        return 0
    from soaklib.attacks import run_attack

    print(json.dumps(run_attack(args.worker, args.port, args.seconds, args.seed, args.scale)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker() if "--worker" in sys.argv else main())
