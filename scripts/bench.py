#!/usr/bin/env python3
"""Benchmark gochat against the Go reference broadcaster (examples/go/chat).

    python scripts/bench.py                      # every scenario, both servers (~3-5 min)
    python scripts/bench.py --quick              # smoke test, < 60 s
    python scripts/bench.py --scenarios idle,connect --duration 5
    python scripts/bench.py --compare-generators # Go loadgen vs a Python/gevent generator

Every scenario runs for gochat AND the Go reference in the same run, one server
process at a time (fresh processes per run), driven by scripts/loadgen. The
script builds the Go binaries into <out>/bin (again when their sources are
newer), prints machine facts, ONE table and the targets, and writes
<out>/bench-<timestamp>.json (every raw loadgen JSON plus server CPU/RSS per
run) and <out>/bench-<timestamp>.png (delivery latency p50/p99 against offered
load), copied to <out>/latest.json and <out>/latest.png. Server, goref and
loadgen stderr go to <out>/logs/<timestamp>/.

gochat runs with --rate 1000000 --burst 1000000: its per-connection rate limit
is meant for humans, while bench senders send hundreds of messages per second.

Scenarios: fanout-max, fanout-1M (plus its sweep of offered load), small-rooms,
idle, connect. Each process the script starts is stopped by its PID on exit,
on an exception and on Ctrl-C (and dies with the script even on SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib.procs import Children, LineReader, Sampler, free_port, machine_busy_s, tree_rss_kb, wait_port  # noqa: E402

SCENARIOS = ["fanout-max", "fanout-1M", "small-rooms", "idle", "connect"]
HOST = "127.0.0.1"
GOCHAT_BENCH_FLAGS = ["--admin-port", "0", "--profile", "prod", "--rate", "1000000", "--burst", "1000000",
                      "--max-connections", "19500"]
RATE_NOTE = ("gochat runs with --rate 1000000 --burst 1000000: its per-connection token bucket (default 20/s, "
             "burst 40) is meant for humans, and bench senders send hundreds of msgs/s, so it is raised for the bench")
GO_MISSING = "go not found on PATH: install Go: apt-get install -y golang-go"
SERVERS = ("gochat", "go")
LABEL = {"gochat": "gochat", "go": "Go ref"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ parameters


def params(args: argparse.Namespace) -> dict[str, Any]:
    """Scenario sizes: the brief's for a normal run, small ones with --quick."""
    q = args.quick
    d = args.duration if args.duration is not None else (1.0 if q else 10.0)
    sweep_d = args.sweep_duration if args.sweep_duration is not None else (d if q else max(1.0, d / 2))
    return {
        "duration_s": d,
        "sweep_duration_s": sweep_d,
        "drain_s": 1.0 if q else 3.0,
        "fanout-max": {"members": 200 if q else 1000, "senders": 10, "window": 4, "size": 100},
        "fanout-1M": {"members": 100 if q else 1000, "senders": 10, "size": 100, "rate": 100,
                      "sweep_rates": [10, 25, 50]},
        "small-rooms": {"members": 20 if q else 100, "senders": 20 if q else 100, "size": 100, "rate": 50},
        "idle": {"conns": 1000 if q else 19000, "rooms": 10 if q else 190, "srcs": 4,
                 "settle_s": 0.5 if q else 2.0, "samples": 5, "sample_every_s": 0.2},
        "connect": {"concurrency": args.connect_concurrency},
    }


# ------------------------------------------------------------------ machine facts


def _run(argv: list[str], timeout: float = 30) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"


def machine_facts(args: argparse.Namespace) -> dict[str, Any]:
    mem_kb = 0
    cpu_model = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gochat_version = _run([args.python, "-c", "import gochat; print(gochat.__version__)"])
    gevent_version = _run([args.python, "-c", "import gevent; print(gevent.__version__)"])
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "status", "--porcelain", "--", "gochat"])
    return {
        "nproc": os.cpu_count(),
        "nproc_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_total_mb": round(mem_kb / 1024),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "python_gochat": _run([args.python, "-c", "import sys; print(sys.version.split()[0])"]) + f" ({args.python})",
        "python_bench": platform.python_version(),
        "go": _run(["go", "version"]),
        "gochat_version": gochat_version,
        "gevent_version": gevent_version,
        "git_commit": commit + (" (gochat/ modified)" if dirty and not dirty.startswith("unavailable") else ""),
        "open_file_limit": _nofile(),
    }


def _nofile() -> list[int]:
    import resource

    return list(resource.getrlimit(resource.RLIMIT_NOFILE))


# ------------------------------------------------------------------ build


def build(outdir: Path) -> dict[str, Path]:
    if shutil.which("go") is None:
        print(f"ERROR: {GO_MISSING}", file=sys.stderr)
        sys.exit(3)
    bindir = outdir / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    mods = {"loadgen": ROOT / "scripts" / "loadgen", "goref": ROOT / "examples" / "go" / "chat"}
    bins = {}
    for name, mod in mods.items():
        out = bindir / name
        srcs = [p for p in mod.iterdir() if p.suffix == ".go" or p.name in ("go.mod", "go.sum")]
        newest = max(p.stat().st_mtime for p in srcs)
        if not out.exists() or out.stat().st_mtime < newest:
            log(f"building {name} from {mod.relative_to(ROOT)}")
            r = subprocess.run(["go", "build", "-o", str(out.resolve()), "."], cwd=mod, capture_output=True,
                               text=True, timeout=600)
            if r.returncode != 0:
                print(f"ERROR: go build of {mod} failed:\n{r.stdout}{r.stderr}", file=sys.stderr)
                sys.exit(3)
        bins[name] = out.resolve()
    return bins


# ------------------------------------------------------------------ the bench


class Bench:
    def __init__(self, args: argparse.Namespace, bins: dict[str, Path], stamp: str) -> None:
        self.args = args
        self.bins = bins
        self.stamp = stamp
        self.out = Path(args.out)
        self.logdir = self.out / "logs" / stamp
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.children = Children()
        self.runs: list[dict[str, Any]] = []
        self.p = params(args)
        self.gochat_extra = shlex.split(args.gochat_args or "")
        self._n = 0

    # ---- servers

    def server_cmd(self, kind: str, port: int) -> list[str]:
        if kind == "gochat":
            return [self.args.python, "-m", "gochat", "serve", "--host", HOST, "--port", str(port),
                    *GOCHAT_BENCH_FLAGS, *self.gochat_extra]
        return [str(self.bins["goref"]), "-addr", f"{HOST}:{port}"]

    def start_server(self, kind: str, tag: str) -> dict[str, Any]:
        port = free_port(HOST)
        cmd = self.server_cmd(kind, port)
        self._n += 1
        logpath = self.logdir / f"{self._n:02d}-{tag}-{kind}-server.log"
        logf = open(logpath, "wb")
        t0 = time.monotonic()
        proc = self.children.start(cmd, f"{kind}-server", stderr=logf, stdout=logf, cwd=str(ROOT))
        logf.close()
        try:
            wait_port(HOST, port, proc, limit=20.0)
        except RuntimeError as exc:
            self.children.stop(proc, grace=3)
            raise RuntimeError(f"{kind} server for {tag}: {exc}; see {logpath}") from None
        startup = time.monotonic() - t0
        time.sleep(0.3)  # let the probe connection go and the heap settle
        sampler = Sampler(proc.pid)
        sampler.start()
        return {"kind": kind, "proc": proc, "port": port, "addr": f"{HOST}:{port}", "cmd": cmd,
                "log": str(logpath), "sampler": sampler, "startup_s": round(startup, 3)}

    def stop_server(self, srv: dict[str, Any]) -> dict[str, Any]:
        srv["sampler"].stop()
        alive = srv["proc"].poll() is None
        t0 = time.monotonic()
        rc = self.children.stop(srv["proc"], grace=15)
        return {"alive_at_end": alive, "exit_code": rc, "stop_s": round(time.monotonic() - t0, 3)}

    # ---- loadgen

    def loadgen(self, srv: dict[str, Any], tag: str, largs: list[str], timeout: float) -> dict[str, Any]:
        cmd = [str(self.bins["loadgen"]), "-addr", srv["addr"], "-proto",
               "gochat" if srv["kind"] == "gochat" else "raw", *largs]
        errpath = self.logdir / f"{self._n:02d}-{tag}-{srv['kind']}-loadgen.log"
        return self._run_generator(srv, cmd, "loadgen", f"loadgen for {tag}/{srv['kind']}", errpath, timeout)

    def _run_generator(self, srv: dict[str, Any], cmd: list[str], name: str, what: str, errpath: Path,
                       timeout: float, json_key: str = "mode") -> dict[str, Any]:
        """Run one generator against ``srv``; its last JSON line, with the server's CPU and the
        machine's busy time over exactly the generator's lifetime."""
        with open(errpath, "wb") as errf:
            t0 = time.monotonic()
            cpu0 = srv["sampler"].sample()[1]
            busy0 = machine_busy_s()
            proc = self.children.start(cmd, name, stdout=subprocess.PIPE, stderr=errf)
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{what} exceeded {timeout:.0f} s: stopping it")
                self.children.stop(proc, grace=5)
                out = b""
            t1 = time.monotonic()
            cpu1 = srv["sampler"].sample()[1]
            busy1 = machine_busy_s()
        self.children.stop(proc, grace=1)
        return {"cmd": cmd, "rc": proc.returncode, "json": _last_json(out, key=json_key), "t0": t0, "t1": t1,
                "server_cpu_run_s": round(cpu1 - cpu0, 3), "machine_busy_s": round(busy1 - busy0, 3),
                "log": str(errpath)}

    # ---- runs

    def _record(self, scenario: str, point: str | None, srv: dict[str, Any], lg: dict[str, Any],
                phase: tuple[str, float, float], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        s: Sampler = srv["sampler"]
        name, p0, p1 = phase
        j = lg["json"] or {}
        wall = j.get("wall_s") or 0
        rec = {
            "scenario": scenario, "point": point, "server": srv["kind"],
            "server_cmd": srv["cmd"], "server_startup_s": srv["startup_s"], "server_log": srv["log"],
            "loadgen_cmd": lg["cmd"], "loadgen_rc": lg["rc"], "loadgen_log": lg["log"],
            "loadgen": lg["json"],
            "server_cpu": {
                "phase": name, "phase_s": round(p1 - p0, 3),
                "cpu_s": round(s.cpu_at(p1) - s.cpu_at(p0), 3),
                "cores": _r3(s.cores(p0, p1)),
                "run_cpu_s": lg["server_cpu_run_s"],
                "run_cores": _r3(lg["server_cpu_run_s"] / (lg["t1"] - lg["t0"])) if lg["t1"] > lg["t0"] else None,
            },
            "server_rss_kb": {"max_during_run": s.rss_max(lg["t0"], lg["t1"])},
            "gen_cpu_s": j.get("cpu_s"), "gen_wall_s": wall,
            "gen_cores": _r3(j["cpu_s"] / wall) if wall and j.get("cpu_s") is not None else None,
        }
        span = lg["t1"] - lg["t0"]
        if span > 0 and "machine_busy_s" in lg:
            other = lg["machine_busy_s"] - lg["server_cpu_run_s"] - (j.get("cpu_s") or 0)
            rec["machine"] = {"busy_cores": _r3(lg["machine_busy_s"] / span),
                              "other_procs_cores": _r3(max(0.0, other) / span)}
        if extra:
            rec.update(extra)
        return rec

    def fanout(self, scenario: str, point: str | None, kind: str, fl: dict[str, Any], duration: float,
               offered: float | None) -> dict[str, Any]:
        tag = scenario + (f"-{point}" if point else "")
        srv = self.start_server(kind, tag)
        try:
            largs = ["-mode", "fanout", "-members", str(fl["members"]), "-senders", str(fl["senders"]),
                     "-size", str(fl["size"]), "-duration", str(duration), "-drain", str(self.p["drain_s"]),
                     "-room", "bench"]
            if fl.get("rate"):
                largs += ["-rate", str(fl["rate"])]
            else:
                largs += ["-window", str(fl["window"])]
            lg = self.loadgen(srv, tag, largs, timeout=duration + self.p["drain_s"] + 90)
            j = lg["json"] or {}
            p0 = lg["t0"] + (j.get("setup_s") or 0)
            p1 = p0 + (j.get("duration_s") or 0)
            rec = self._record(scenario, point, srv, lg, ("send", p0, p1),
                               {"offered_deliveries_per_s": offered, "params": dict(fl, duration_s=duration)})
        finally:
            rec_stop = self.stop_server(srv)
        return self._keep(rec, rec_stop)

    def _keep(self, rec: dict[str, Any], server_stop: Any) -> dict[str, Any]:
        """Record a finished run: the server's stop, its index, a progress line."""
        rec["server_stop"] = server_stop
        rec["run_index"] = len(self.runs)
        self.runs.append(rec)
        _progress(rec)
        return rec

    def idle(self, kind: str) -> dict[str, Any]:
        ip = self.p["idle"]
        srv = self.start_server(kind, "idle")
        s: Sampler = srv["sampler"]
        try:
            time.sleep(ip["settle_s"] / 2)
            baseline = max(tree_rss_kb(srv["proc"].pid) for _ in range(3))
            largs = ["-mode", "idle", "-conns", str(ip["conns"]), "-srcs", str(ip["srcs"]), "-hold", "900"]
            if kind == "gochat":
                largs += ["-rooms", str(ip["rooms"]), "-room", "idle"]
            cmd = [str(self.bins["loadgen"]), "-addr", srv["addr"], "-proto",
                   "gochat" if kind == "gochat" else "raw", *largs]
            errpath = self.logdir / f"{self._n:02d}-idle-{kind}-loadgen.log"
            held: list[int] = []
            holding = None
            with open(errpath, "wb") as errf:
                t0 = time.monotonic()
                cpu0 = s.sample()[1]
                busy0 = machine_busy_s()
                proc = self.children.start(cmd, "loadgen", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=errf)
                reader = LineReader(proc.stdout)
                reader.start()
                line = reader.wait_for(lambda ln: '"holding"' in ln, timeout=180)
                t_hold = time.monotonic()
                if line is not None:
                    holding = json.loads(line)["holding"]
                    time.sleep(ip["settle_s"])
                    for _ in range(ip["samples"]):
                        held.append(tree_rss_kb(srv["proc"].pid))
                        time.sleep(ip["sample_every_s"])
                else:
                    log(f"idle/{kind}: no holding line within 180 s")
                t_end_hold = time.monotonic()
                try:  # closing stdin ends the hold
                    proc.stdin.close()
                except OSError:
                    pass
                final = reader.wait_for(lambda ln: '"mode"' in ln, timeout=120)
                if final is None:
                    log(f"idle/{kind}: no report from loadgen within 120 s of closing its stdin")
                self.children.stop(proc, grace=5)
                t1 = time.monotonic()
                cpu1 = s.sample()[1]
                busy1 = machine_busy_s()
            j = json.loads(final) if final else None
            lg = {"cmd": cmd, "rc": proc.returncode, "json": j, "t0": t0, "t1": t1,
                  "server_cpu_run_s": round(cpu1 - cpu0, 3), "machine_busy_s": round(busy1 - busy0, 3),
                  "log": str(errpath)}
            setup_s = (j or {}).get("setup_s") or (t_hold - t0)
            held_max = max(held) if held else None
            per_conn = ((held_max - baseline) / holding) if held_max and holding else None
            rec = self._record("idle", None, srv, lg, ("setup", t0, t0 + setup_s), {
                "params": dict(ip),
                "holding": holding,
                "server_rss_kb": {"baseline": baseline, "held_samples": held, "held_max": held_max,
                                  "max_during_run": s.rss_max(t0, t1)},
                "rss_per_conn_kb": _r3(per_conn),
                "hold_sampled_s": round(t_end_hold - t_hold, 3),
            })
        finally:
            rec_stop = self.stop_server(srv)
        return self._keep(rec, rec_stop)

    def connect(self, kind: str) -> dict[str, Any]:
        d = self.p["duration_s"]
        c = self.p["connect"]["concurrency"]
        srv = self.start_server(kind, "connect")
        try:
            lg = self.loadgen(srv, "connect", ["-mode", "connect", "-concurrency", str(c), "-duration", str(d)],
                              timeout=d + 60)
            rec = self._record("connect", None, srv, lg, ("run", lg["t0"], lg["t1"]),
                               {"params": {"concurrency": c, "duration_s": d}})
        finally:
            rec_stop = self.stop_server(srv)
        return self._keep(rec, rec_stop)

    # ---- scenarios

    def safe(self, scenario: str, point: str | None, kind: str, fn, *a) -> dict[str, Any]:
        """One run; a server that does not start (or another setup error) is
        recorded as a failed run and the bench goes on."""
        try:
            return fn(*a)
        except (RuntimeError, OSError) as exc:
            log(f"!!! {scenario}{'/' + point if point else ''} {kind}: {exc}")
            rec = {"scenario": scenario, "point": point, "server": kind, "error": str(exc), "loadgen": None,
                   "loadgen_rc": None, "loadgen_log": "-", "server_log": "-",
                   "server_cpu": {"phase": None, "cores": None}, "gen_cores": None,
                   "server_stop": {"alive_at_end": False, "exit_code": None}, "params": {}}
            rec["run_index"] = len(self.runs)
            self.runs.append(rec)
            return rec

    def run(self, scenarios: list[str]) -> dict[str, Any]:
        res: dict[str, Any] = {}
        d = self.p["duration_s"]
        for sc in scenarios:
            log(f"scenario {sc}")
            if sc == "fanout-max":
                fl = self.p[sc]
                res[sc] = {k: self.safe(sc, None, k, self.fanout, sc, None, k, fl, d, None) for k in SERVERS}
            elif sc == "fanout-1M":
                fl = self.p[sc]
                sweep = {}
                for rate in fl["sweep_rates"]:
                    pf = dict(fl, rate=rate)
                    offered = rate * fl["senders"] * fl["members"]
                    sweep[f"rate={rate}"] = {k: self.safe(sc, f"rate{rate}", k, self.fanout, sc, f"rate{rate}", k, pf,
                                                          self.p["sweep_duration_s"], offered) for k in SERVERS}
                offered = fl["rate"] * fl["senders"] * fl["members"]
                top = {k: self.safe(sc, None, k, self.fanout, sc, None, k, fl, d, offered) for k in SERVERS}
                res[sc] = dict(top, sweep=sweep)
            elif sc == "small-rooms":
                fl = self.p[sc]
                offered = fl["rate"] * fl["senders"] * fl["members"]
                res[sc] = {k: self.safe(sc, None, k, self.fanout, sc, None, k, fl, d, offered) for k in SERVERS}
            elif sc == "idle":
                res[sc] = {k: self.safe(sc, None, k, self.idle, k) for k in SERVERS}
            elif sc == "connect":
                res[sc] = {k: self.safe(sc, None, k, self.connect, k) for k in SERVERS}
        return res

    # ---- generator comparison

    def compare_generators(self) -> dict[str, Any]:
        """fanout-max against the Go reference, alternating the Go loadgen and the
        Python/gevent generator (A B A B ...), fresh server each run; the best run of
        each counts, which is fairer than one run each on a noisy machine."""
        fl = self.p["fanout-max"]
        d = self.p["duration_s"]
        out: dict[str, Any] = {"scenario": "fanout-max against the Go reference", "params": dict(fl, duration_s=d),
                               "loadgen_runs": [], "pyload_runs": []}
        for i in range(self.args.compare_repeats):
            out["loadgen_runs"].append(self.fanout("compare-generators", f"loadgen{i + 1}", "go", fl, d, None))
            out["pyload_runs"].append(self._pyload(fl, d, i + 1))

        def best(recs):
            return max(recs, key=lambda r: _g(r, "deliveries_per_s") or 0)

        out["loadgen"] = best(out["loadgen_runs"])
        out["pyload"] = best(out["pyload_runs"])
        return out

    def _pyload(self, fl: dict[str, Any], d: float, n: int) -> dict[str, Any]:
        srv = self.start_server("go", f"compare-pyload{n}")
        try:
            cmd = [self.args.python, str(ROOT / "scripts" / "benchlib" / "pyload.py"), "-addr", srv["addr"],
                   "-members", str(fl["members"]), "-senders", str(fl["senders"]), "-window", str(fl["window"]),
                   "-size", str(fl["size"]), "-duration", str(d), "-drain", str(self.p["drain_s"])]
            errpath = self.logdir / f"{self._n:02d}-compare-pyload{n}.log"
            lg = self._run_generator(srv, cmd, "pyload", f"pyload {n}", errpath, d + 90,
                                     json_key="deliveries_per_s")
            j = lg["json"]
            p0 = lg["t0"] + ((j or {}).get("setup_s") or 0)
            rec = self._record("compare-generators", f"pyload{n}", srv, lg,
                               ("send", p0, p0 + ((j or {}).get("duration_s") or 0)))
        finally:
            rec_stop = self.stop_server(srv)
        return self._keep(rec, rec_stop)


def _last_json(out: bytes, key: str = "mode") -> dict[str, Any] | None:
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                j = json.loads(line)
            except ValueError:
                continue
            if key in j:
                return j
    return None


def _r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _progress(rec: dict[str, Any]) -> None:
    j = rec.get("loadgen") or {}
    bits = [f"{rec['scenario']}{'/' + rec['point'] if rec['point'] else ''} {rec['server']}:"]
    if "deliveries_per_s" in j:
        bits.append(f"{j['deliveries_per_s']:,.0f} deliveries/s")
        lat = j.get("latency_ms") or {}
        if lat.get("count"):
            bits.append(f"p50 {lat['p50']} ms p99 {lat['p99']} ms")
        if j.get("lost"):
            bits.append(f"LOST {j['lost']} (connected {j.get('lost_connected')})")
    if "connects_per_s" in j:
        bits.append(f"{j['connects_per_s']:,.0f} connects/s")
    if rec.get("rss_per_conn_kb") is not None:
        bits.append(f"{rec['rss_per_conn_kb']:.2f} KB/conn")
    if j.get("errors"):
        bits.append(f"errors {j['errors']}")
    if not j:
        bits.append("NO RESULT from the generator")
    bits.append(f"server {rec['server_cpu']['cores']} cores, gen {rec['gen_cores']} cores")
    log(" ".join(str(b) for b in bits))


# ------------------------------------------------------------------ analysis and table


def _lat(rec: dict[str, Any] | None, p: str) -> float | None:
    if not rec or not rec.get("loadgen"):
        return None
    lat = rec["loadgen"].get("latency_ms") or {}
    return lat.get(p) if lat.get("count") else None


def _g(rec: dict[str, Any] | None, key: str) -> Any:
    return ((rec or {}).get("loadgen") or {}).get(key)


def loss_of(rec: dict[str, Any] | None) -> dict[str, Any]:
    """Everything that says a delivery or a request went wrong in one run."""
    j = (rec or {}).get("loadgen") or {}
    if not j:
        return {"no_result": True}
    out = {k: j.get(k, 0) for k in ("lost", "lost_connected", "duplicates", "out_of_order", "unacked", "rejected")
           if j.get(k)}
    if j.get("mode") == "fanout":
        if j.get("members_ok") != j.get("members") or j.get("senders_ok") != j.get("senders"):
            out["setup_failed"] = (j.get("members", 0) - (j.get("members_ok") or 0)
                                   + j.get("senders", 0) - (j.get("senders_ok") or 0))
        if j.get("members_disconnected"):
            out["members_disconnected"] = j["members_disconnected"]
    if j.get("mode") == "idle":
        for k in ("failed", "dropped"):
            if j.get(k):
                out[k] = j[k]
    if j.get("mode") == "connect" and j.get("failed"):
        out["failed"] = j["failed"]
    if j.get("errors"):
        out["errors"] = j["errors"]
    return out


def loss_cell(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "-"
    l = loss_of(rec)
    if l.get("no_result"):
        return "NO RESULT!"
    j = rec["loadgen"]
    if j.get("mode") == "fanout":
        s = str(j.get("lost", 0))
        if j.get("lost"):
            s = f"LOST {j['lost']}!"
        if j.get("lost_connected"):
            s += f" ({j['lost_connected']} CONNECTED!!)"
        extra = [f"{k[:4]} {l[k]}" for k in ("duplicates", "out_of_order", "unacked", "rejected") if l.get(k)]
        return " ".join([s, *extra])
    if j.get("mode") == "idle":
        return "0" if not (l.get("failed") or l.get("dropped")) else f"FAILED {l.get('failed', 0)} DROPPED {l.get('dropped', 0)}!"
    if j.get("mode") == "connect":
        return "0" if not l.get("failed") else f"{l['failed']} failed"
    return "?"


def fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1e3:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    return str(x)


def pair(a: Any, b: Any, nd: int = 1) -> str:
    return f"{fmt(a, nd)} / {fmt(b, nd)}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def si(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:g}M"
    if x >= 1e3:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


def build_table(res: dict[str, Any]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    head = ["scenario", "key figure", "gochat", "Go ref", "gc:Go", "loss gc / Go", "p50 ms gc / Go",
            "p99 ms gc / Go", "p99.9 ms gc / Go", "srv cores gc / Go", "gen cores gc / Go"]
    rows = [head]

    def lat_cols(g, o):
        return [pair(_lat(g, "p50"), _lat(o, "p50"), 2), pair(_lat(g, "p99"), _lat(o, "p99"), 2),
                pair(_lat(g, "p999"), _lat(o, "p999"), 2)]

    def cpu_cols(g, o):
        return [pair(g["server_cpu"]["cores"], o["server_cpu"]["cores"], 2),
                pair(g["gen_cores"], o["gen_cores"], 2)]

    summary: list[dict[str, Any]] = []
    if "fanout-max" in res:
        g, o = res["fanout-max"]["gochat"], res["fanout-max"]["go"]
        a, b = _g(g, "deliveries_per_s"), _g(o, "deliveries_per_s")
        rows.append(["fanout-max", "deliveries/s", fmt(a), fmt(b), fmt(ratio(a, b), 2),
                     f"{loss_cell(g)} / {loss_cell(o)}", *lat_cols(g, o), *cpu_cols(g, o)])
    if "fanout-1M" in res:
        r = res["fanout-1M"]
        pts = [(k, v) for k, v in r["sweep"].items()] + [("top", {"gochat": r["gochat"], "go": r["go"]})]
        pts.sort(key=lambda kv: kv[1]["gochat"].get("offered_deliveries_per_s")
                 or kv[1]["go"].get("offered_deliveries_per_s") or 0)
        for k, v in pts:
            g, o = v["gochat"], v["go"]
            off = g.get("offered_deliveries_per_s") or o.get("offered_deliveries_per_s")
            name = "fanout-1M" if k == "top" else f"  sweep {si(off)}/s"
            dur = (g.get("params") or {}).get("duration_s") or (o.get("params") or {}).get("duration_s")
            key = f"p99 ms @{si(off)}/s" + ("" if k == "top" or dur is None else f" ({dur:g}s)")
            a, b = _lat(g, "p99"), _lat(o, "p99")
            rows.append([name, key, fmt(a, 2), fmt(b, 2), fmt(ratio(a, b), 2),
                         f"{loss_cell(g)} / {loss_cell(o)}", *lat_cols(g, o), *cpu_cols(g, o)])
    if "small-rooms" in res:
        g, o = res["small-rooms"]["gochat"], res["small-rooms"]["go"]
        a, b = _lat(g, "p99"), _lat(o, "p99")
        rows.append(["small-rooms", f"p99 ms @{si(g.get('offered_deliveries_per_s') or o.get('offered_deliveries_per_s'))}/s", fmt(a, 2), fmt(b, 2),
                     fmt(ratio(a, b), 2), f"{loss_cell(g)} / {loss_cell(o)}", *lat_cols(g, o), *cpu_cols(g, o)])
    if "idle" in res:
        g, o = res["idle"]["gochat"], res["idle"]["go"]
        a, b = g.get("rss_per_conn_kb"), o.get("rss_per_conn_kb")
        rows.append(["idle", f"KB/conn ({fmt(g.get('holding'))}/{fmt(o.get('holding'))} held)", fmt(a, 2), fmt(b, 2),
                     fmt(ratio(a, b), 2), f"{loss_cell(g)} / {loss_cell(o)}", "-", "-", "-",
                     pair(g["server_cpu"]["cores"], o["server_cpu"]["cores"], 2) + " (setup)",
                     pair(g["gen_cores"], o["gen_cores"], 2)])
    if "connect" in res:
        g, o = res["connect"]["gochat"], res["connect"]["go"]
        a, b = _g(g, "connects_per_s"), _g(o, "connects_per_s")
        rows.append(["connect", f"connects/s (c={(o.get('params') or {}).get('concurrency')})", fmt(a), fmt(b),
                     fmt(ratio(a, b), 2), f"{loss_cell(g)} / {loss_cell(o)}", *lat_cols(g, o), *cpu_cols(g, o)])
    return rows, summary


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Key figures per scenario and server (the raw records are in "runs")."""

    def one(rec: dict[str, Any]) -> dict[str, Any]:
        j = rec.get("loadgen") or {}
        out = {"run_index": rec.get("run_index"), "server_cores": rec["server_cpu"]["cores"],
               "server_cpu_phase": rec["server_cpu"]["phase"], "gen_cores": rec.get("gen_cores"),
               "server_rss_kb": rec.get("server_rss_kb"), "loss": loss_of(rec)}
        for k in ("deliveries_per_s", "msgs_per_s", "connects_per_s", "lost", "lost_connected", "duplicates",
                  "out_of_order", "unacked", "rejected", "max_send_lag_ms"):
            if k in j:
                out[k] = j[k]
        if j.get("latency_ms", {}).get("count"):
            out["latency_ms"] = {p: j["latency_ms"][p] for p in ("p50", "p99", "p999", "max")}
        for k in ("offered_deliveries_per_s", "rss_per_conn_kb", "holding"):
            if rec.get(k) is not None:
                out[k] = rec[k]
        return out

    out: dict[str, Any] = {}
    for sc, v in res.items():
        d = {k: one(v[k]) for k in SERVERS}
        if sc == "fanout-1M":
            d["sweep"] = {pt: {k: one(vv[k]) for k in SERVERS} for pt, vv in v["sweep"].items()}
        key = {"fanout-max": "deliveries_per_s", "connect": "connects_per_s", "idle": "rss_per_conn_kb"}.get(sc)
        if key:
            d["ratio_gochat_to_go"] = _r3(ratio(d["gochat"].get(key), d["go"].get(key)))
        else:
            a = (d["gochat"].get("latency_ms") or {}).get("p99")
            b = (d["go"].get("latency_ms") or {}).get("p99")
            d["p99_ratio_gochat_to_go"] = _r3(ratio(a, b))
        out[sc] = d
    return out


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def no_loss(rec: dict[str, Any] | None) -> bool:
    l = loss_of(rec)
    return not any(l.get(k) for k in ("no_result", "lost", "lost_connected", "duplicates", "out_of_order",
                                       "unacked", "rejected", "setup_failed"))


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    t: list[dict[str, Any]] = []

    def add(sc, what, value, ok):
        t.append({"scenario": sc, "target": what, "value": value, "met": ok})

    if "fanout-max" in res:
        g, o = res["fanout-max"]["gochat"], res["fanout-max"]["go"]
        r = ratio(_g(g, "deliveries_per_s"), _g(o, "deliveries_per_s"))
        add("fanout-max", "deliveries/s gochat:Go >= 1.0", fmt(r, 2), r is not None and r >= 1.0)
    if "fanout-1M" in res:
        g, o = res["fanout-1M"]["gochat"], res["fanout-1M"]["go"]
        add("fanout-1M", "gochat loss 0 (lost, dup, ooo, unacked, rejected all 0)", loss_cell(g), no_loss(g))
        a, b = _lat(g, "p99"), _lat(o, "p99")
        add("fanout-1M", "gochat p99 <= 1.5x Go p99", f"{fmt(a, 2)} vs {fmt(1.5 * b if b else None, 2)} ms",
            a is not None and b is not None and a <= 1.5 * b)
    if "small-rooms" in res:
        g, o = res["small-rooms"]["gochat"], res["small-rooms"]["go"]
        add("small-rooms", "gochat loss 0", loss_cell(g), no_loss(g))
        a, b = _lat(g, "p99"), _lat(o, "p99")
        add("small-rooms", "gochat p99 <= 2x Go p99", f"{fmt(a, 2)} vs {fmt(2 * b if b else None, 2)} ms",
            a is not None and b is not None and a <= 2 * b)
    if "idle" in res:
        a, b = res["idle"]["gochat"].get("rss_per_conn_kb"), res["idle"]["go"].get("rss_per_conn_kb")
        add("idle", "gochat <= 8 KB/conn", f"{fmt(a, 2)} KB", a is not None and a <= 8)
        add("idle", "gochat <= 1/3 of Go's KB/conn", f"{fmt(a, 2)} vs {fmt(b / 3 if b else None, 2)} KB",
            a is not None and b is not None and a <= b / 3)
    if "connect" in res:
        g, o = res["connect"]["gochat"], res["connect"]["go"]
        r = ratio(_g(g, "connects_per_s"), _g(o, "connects_per_s"))
        add("connect", "connects/s gochat:Go >= 1.0", fmt(r, 2), r is not None and r >= 1.0)
    return t


def warnings_for(runs: list[dict[str, Any]]) -> list[str]:
    w = []
    for rec in runs:
        name = f"{rec['scenario']}{'/' + rec['point'] if rec['point'] else ''} [{LABEL.get(rec['server'], rec['server'])}]"
        j = rec.get("loadgen") or {}
        if not j:
            why = rec.get("error") or f"rc {rec['loadgen_rc']}; see {rec['loadgen_log']}"
            w.append(f"!!! {name}: the generator produced no result ({why})")
            continue
        if j.get("error"):
            w.append(f"!!! {name}: generator error: {j['error']}")
        if j.get("lost_connected"):
            w.append(f"!!!!! {name}: LOST {j['lost_connected']} deliveries to CONNECTED members "
                     f"(the server closed neither end): a correctness bug")
        if j.get("lost"):
            w.append(f"!!! {name}: LOST {j['lost']} of {j.get('expected')} deliveries "
                     f"({j.get('members_disconnected', 0)} members disconnected by the server)")
        for k in ("duplicates", "out_of_order", "unacked", "rejected", "foreign"):
            if j.get(k):
                w.append(f"!!! {name}: {k} = {j[k]}")
        if j.get("mode") == "fanout" and (j.get("members_ok") != j.get("members") or j.get("senders_ok") != j.get("senders")):
            w.append(f"!!! {name}: setup incomplete: {j.get('members_ok')}/{j.get('members')} members, "
                     f"{j.get('senders_ok')}/{j.get('senders')} senders, setup_errors {j.get('setup_errors')}")
        if j.get("errors"):
            w.append(f"!   {name}: generator saw errors {j['errors']}")
        if j.get("mode") == "idle" and (j.get("failed") or j.get("dropped")):
            w.append(f"!!! {name}: idle failed {j.get('failed')} dropped {j.get('dropped')} "
                     f"errors {j.get('errors')} {j.get('dropped_errors')}")
        if j.get("mode") == "connect" and j.get("failed"):
            w.append(f"!   {name}: {j['failed']} connect iterations failed")
        lag = j.get("max_send_lag_ms")
        if lag is not None and lag > 100:
            w.append(f"!   {name}: generator fell {lag:.0f} ms behind its send schedule (generator or "
                     f"machine saturated; latencies include that)")
        other = (rec.get("machine") or {}).get("other_procs_cores") or 0
        if other > 0.25:
            w.append(f"!   {name}: other processes on the machine used {other:.2f} cores during this run "
                     f"(noisy neighbour: figures are less reliable)")
        if (rec.get("gen_cores") or 0) > 0.95:
            w.append(f"!   {name}: generator used {rec['gen_cores']:.2f} cores of 2: it competes with the server")
        stop = rec.get("server_stop") or {}
        if not stop.get("alive_at_end", True):
            w.append(f"!!! {name}: the server process had EXITED before the end of the run "
                     f"(exit {stop.get('exit_code')}); see {rec['server_log']}")
        elif stop.get("exit_code") not in (0, None, -signal.SIGTERM):
            w.append(f"!   {name}: server exit status {stop.get('exit_code')} after SIGTERM "
                     f"(stop took {stop.get('stop_s')} s); see {rec['server_log']}")
    return w


# ------------------------------------------------------------------ plot


def plot(res: dict[str, Any], path: Path, facts: dict[str, Any]) -> str | None:
    if "fanout-1M" not in res:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("matplotlib is missing (pip install matplotlib): no PNG written")
        return None
    r = res["fanout-1M"]
    pts = list(r["sweep"].values()) + [{"gochat": r["gochat"], "go": r["go"]}]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    style = {"gochat": dict(color="tab:blue", marker="o"), "go": dict(color="tab:orange", marker="s")}
    for ax, p in zip(axes, ("p50", "p99")):
        for kind in SERVERS:
            xs, ys, bad = [], [], []
            for pt in sorted(pts, key=lambda v: v[kind].get("offered_deliveries_per_s") or 0):
                rec = pt[kind]
                y = _lat(rec, p)
                if y is None:
                    continue
                x = rec["offered_deliveries_per_s"]
                xs.append(x)
                ys.append(max(y, 1e-3))
                if not no_loss(rec):
                    bad.append((x, max(y, 1e-3)))
            ax.plot(xs, ys, label=LABEL[kind], **style[kind])
            if bad:
                ax.scatter([b[0] for b in bad], [b[1] for b in bad], s=160, facecolors="none",
                           edgecolors="red", linewidths=2, zorder=5,
                           label=f"{LABEL[kind]}: loss or errors")
        ax.set_xscale("log")
        ax.set_yscale("log")
        fl = r["gochat"].get("params") or {}
        ax.set_xlabel(f"offered deliveries/s ({fl.get('members')} members x {fl.get('senders')} senders x rate)")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"delivery latency {p}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("ms (log)")
    fig.suptitle(f"gochat vs Go reference, fanout sweep - {facts.get('nproc')} cores, "
                 f"gochat {facts.get('gochat_version')}, {time.strftime('%Y-%m-%d %H:%M')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of: {','.join(SCENARIOS)} (default: all)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of sending/churning per run (default 10; 1 with --quick)")
    ap.add_argument("--sweep-duration", type=float, default=None,
                    help="seconds per fanout-1M sweep point (default duration/2)")
    ap.add_argument("--quick", action="store_true", help="short durations and small sizes (smoke test, < 60 s)")
    ap.add_argument("--out", default=str(ROOT / "bench-results"), help="output directory (default bench-results)")
    ap.add_argument("--gochat-args", default="", help='extra args for "gochat serve"; write it with = since the value starts with --: --gochat-args="--history-size 100"')
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs gochat (default: this one)")
    ap.add_argument("--connect-concurrency", type=int, default=16,
                    help="connect scenario workers, the same for both servers (default 16)")
    ap.add_argument("--compare-repeats", type=int, default=2,
                    help="--compare-generators: runs of each generator, alternating; the best of each counts")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before starting, wait up to S seconds for other processes to use < 0.3 cores (default 0)")
    ap.add_argument("--strict", action="store_true",
                    help="exit 2 when a target is not met or any run lost deliveries (default: exit 0 when every "
                         "run produced a measurement, 1 otherwise, 3 if go is missing)")
    ap.add_argument("--compare-generators", action="store_true",
                    help="run fanout-max against the Go reference with the Go loadgen and with the Python/gevent "
                         "generator (scripts/benchlib/pyload.py); only this, unless --scenarios is also given")
    a = ap.parse_args(argv)
    scen = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    bad = [s for s in scen if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {','.join(bad)}; choose from {','.join(SCENARIOS)}")
    a.scenario_list = [s for s in SCENARIOS if s in scen]
    explicit = any(x == "--scenarios" or x.startswith("--scenarios=") for x in (argv if argv is not None else sys.argv[1:]))
    if a.compare_generators and not explicit:
        a.scenario_list = []
    return a


def busy_cores(window: float) -> float:
    b0, t0 = machine_busy_s(), time.monotonic()
    time.sleep(window)
    return round((machine_busy_s() - b0) / (time.monotonic() - t0), 2)


def wait_quiet(limit: float) -> float:
    """Cores other processes keep busy now; with --wait-quiet, wait (at most
    limit seconds) until that is under 0.3."""
    busy = busy_cores(1.0)
    deadline = time.monotonic() + limit
    while busy > 0.3 and time.monotonic() < deadline:
        log(f"machine busy ({busy} cores used by other processes): waiting for it to calm down "
            f"(at most {max(0, deadline - time.monotonic()):.0f} s more)")
        time.sleep(3)
        busy = busy_cores(2.0)
    return busy


def _sigterm(signum, frame):  # turn SIGTERM/SIGHUP into a normal exit, so finally blocks run
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The real interpreter, not a wrapper script (a pyenv shim would leave the
    # server as a child of the PID we measure and signal).
    try:
        args.python = subprocess.run([args.python, "-c", "import sys; print(sys.executable)"], capture_output=True,
                                     text=True, timeout=30, check=True).stdout.strip() or args.python
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"ERROR: --python {args.python} does not run: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C -> KeyboardInterrupt, even if inherited ignored
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)
    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bins = build(out)  # exits 3 if go is missing
    stamp = time.strftime("%Y%m%d-%H%M%S")
    facts = machine_facts(args)
    tq = time.monotonic()
    facts["busy_cores_before_start"] = wait_quiet(args.wait_quiet)
    facts["waited_for_quiet_s"] = round(time.monotonic() - tq - 1.0, 1)
    if facts["busy_cores_before_start"] > 0.3:
        log(f"WARNING: the machine is busy before the bench starts ({facts['busy_cores_before_start']} cores "
            f"used by other processes): results will be noisy")
    bench = Bench(args, bins, stamp)
    try:
        res = bench.run(args.scenario_list)
        comp = bench.compare_generators() if args.compare_generators else None
    except KeyboardInterrupt:
        log("interrupted: stopping every process this bench started")
        return 130
    finally:
        bench.children.stop_all()
    facts["loadavg_at_end"] = os.getloadavg()
    total = time.monotonic() - t_start

    print("=" * 100)
    print(f"gochat bench {stamp}   {'QUICK (smoke test) ' if args.quick else ''}total wall {total:.0f} s")
    print(f"machine: nproc {facts['nproc']} (usable {facts['nproc_usable']}), {facts['cpu_model']}, "
          f"mem {facts['mem_total_mb']} MB, kernel {facts['kernel']}, load avg {facts['loadavg_at_start'][0]:.2f} "
          f"at start / {facts['loadavg_at_end'][0]:.2f} at end, {facts['busy_cores_before_start']} cores busy "
          f"with other processes just before the start"
          + (f" (after waiting {facts['waited_for_quiet_s']:.0f} s for quiet)" if args.wait_quiet else ""))
    print(f"python {facts['python_gochat']}, bench python {facts['python_bench']}, {facts['go']}, "
          f"gochat {facts['gochat_version']} (gevent {facts['gevent_version']}), commit {facts['git_commit']}")
    print(f"NOTE: {RATE_NOTE}.")
    p = bench.p
    print(f"durations: {p['duration_s']:g} s per run, {p['sweep_duration_s']:g} s per sweep point, drain <= "
          f"{p['drain_s']:g} s; every run on fresh server processes, one server at a time; "
          f"server cores = CPU s / wall s of the send phase (idle: setup; connect: whole run); "
          f"gen cores = loadgen cpu_s / wall_s")

    tgt: list[dict[str, Any]] = []
    rows: list[list[str]] = []
    warns = warnings_for(bench.runs)
    if res:
        rows, _ = build_table(res)
        print()
        print(render(rows))
        tgt = targets(res)
        print()
        print("targets:")
        w = max(len(t["scenario"]) for t in tgt) if tgt else 0
        w2 = max(len(t["target"]) for t in tgt) if tgt else 0
        for t in tgt:
            print(f"  {t['scenario']:<{w}}  {t['target']:<{w2}}  {t['value']:<28} {'met' if t['met'] else 'NOT MET'}")
        print(f"  {sum(t['met'] for t in tgt)} of {len(tgt)} targets met")
    if comp:
        a = _g(comp["loadgen"], "deliveries_per_s")
        b = _g(comp["pyload"], "deliveries_per_s")
        print()
        print(f"generator comparison (fanout-max against the Go reference, best of {args.compare_repeats} "
              f"alternating runs each):")
        print(f"  Go loadgen      {fmt(a):>14} deliveries/s   gen cores {fmt(comp['loadgen']['gen_cores'], 2)}   "
              f"server cores {fmt(comp['loadgen']['server_cpu']['cores'], 2)}")
        print(f"  Python/gevent   {fmt(b):>14} deliveries/s   gen cores {fmt(comp['pyload']['gen_cores'], 2)}   "
              f"server cores {fmt(comp['pyload']['server_cpu']['cores'], 2)}")
        if a and b:
            print(f"  Go loadgen drives the reference {'at least as hard' if a >= b else 'LESS hard'} "
                  f"({a / b:.2f}x the Python generator)")
    if warns:
        print()
        print("FAILURES AND WARNINGS:")
        for line in warns:
            print("  " + line)

    doc = {
        "stamp": stamp, "quick": args.quick, "total_wall_s": round(total, 3),
        "machine": facts, "notes": [RATE_NOTE],
        "gochat_server_flags": GOCHAT_BENCH_FLAGS + bench.gochat_extra,
        "gochat_env": {k: v for k, v in os.environ.items() if k.startswith("GOCHAT_")},
        "params": p, "scenarios": args.scenario_list, "table": rows, "targets": tgt, "warnings": warns,
        "summary": summarize(res) if res else None,
        "compare_generators": {
            "loadgen_deliveries_per_s": _g(comp["loadgen"], "deliveries_per_s"),
            "pyload_deliveries_per_s": _g(comp["pyload"], "deliveries_per_s"),
            "loadgen_all": [_g(r, "deliveries_per_s") for r in comp["loadgen_runs"]],
            "pyload_all": [_g(r, "deliveries_per_s") for r in comp["pyload_runs"]],
            "loadgen_run_index": comp["loadgen"]["run_index"], "pyload_run_index": comp["pyload"]["run_index"],
        } if comp else None,
        "runs": bench.runs,
    }
    name = f"bench-{stamp}" if res else f"generators-{stamp}"
    jpath = out / f"{name}.json"
    jpath.write_text(json.dumps(doc, indent=1, default=str))
    png = plot(res, out / f"{name}.png", facts) if res else None
    if res:
        shutil.copyfile(jpath, out / "latest.json")
        if png:
            shutil.copyfile(png, out / "latest.png")
    print()
    print(f"wrote {jpath}" + (f" and {png}" if png else "") + (" (copied to latest.*)" if res else "")
          + f"; logs in {bench.logdir}")
    broken = [w for w in warns if "no result" in w or "EXITED" in w or "setup incomplete" in w]
    if broken:
        print(f"exit 1: {len(broken)} run(s) did not produce a valid measurement")
        return 1
    if args.strict and (any(not t["met"] for t in tgt) or any(w.startswith("!!!") for w in warns)):
        print("exit 2 (--strict): a target is not met or a run lost deliveries")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
