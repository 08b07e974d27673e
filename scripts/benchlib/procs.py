"""Process handling for scripts/bench.py: start children we own, sample their
CPU and memory from /proc, and always stop them by PID.

Only processes started through `Children.start` are ever signalled.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from typing import IO, Any, Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _LIBC = None


def _pdeathsig() -> None:
    """In the child before exec: die with SIGKILL if the bench process dies
    (even by SIGKILL, where no cleanup code of ours can run). Children are
    started from the main thread only: the signal follows the forking thread."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class Children:
    """Every process the bench starts. Each runs in its own session, so a
    Ctrl-C in the terminal reaches only the bench, which then stops them by
    PID (SIGTERM, a grace period, then SIGKILL)."""

    def __init__(self) -> None:
        self._procs: list[tuple[subprocess.Popen, str]] = []
        self._lock = threading.Lock()

    def start(self, argv: Sequence[str], name: str, *, stdin: Any = subprocess.DEVNULL,
              stdout: Any = subprocess.DEVNULL, stderr: Any = subprocess.DEVNULL,
              env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                                start_new_session=True, preexec_fn=_pdeathsig, close_fds=True)
        with self._lock:
            self._procs.append((proc, name))
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 12.0) -> int | None:
        """SIGTERM proc (by its PID), wait up to grace seconds, then SIGKILL."""
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except Exception:
                    pass
        with self._lock:
            self._procs = [(p, n) for p, n in self._procs if p is not proc]
        return proc.returncode

    def stop_all(self, grace: float = 3.0) -> None:
        with self._lock:
            procs = list(self._procs)
        for proc, _ in procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc, _ in procs:
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    pass
        with self._lock:
            self._procs = []


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, proc: subprocess.Popen, limit: float = 20.0) -> float:
    """Poll connect() until the port accepts; returns seconds waited. Raises
    RuntimeError if proc exits or limit passes."""
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before accepting connections")
        try:
            with socket.create_connection((host, port), timeout=0.25):
                return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > limit:
            raise RuntimeError(f"server did not accept connections on {host}:{port} within {limit:.0f} s")
        time.sleep(0.05)


# ---------------------------------------------------------------- /proc


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    """pid and its descendants (gochat --workers N forks)."""
    seen, todo = [], [pid]
    while todo and len(seen) < 256:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rpartition(")")[2].split()
        return int(rest[11]) + int(rest[12])
    except (OSError, IndexError, ValueError):
        return 0


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_cpu_s(pid: int) -> float:
    return sum(cpu_ticks(p) for p in tree(pid)) / CLK_TCK


def tree_rss_kb(pid: int) -> int:
    return sum(rss_kb(p) for p in tree(pid))


class Sampler(threading.Thread):
    """Samples a server's CPU seconds and RSS every `interval` seconds, with
    monotonic timestamps, so any phase's CPU can be read afterwards."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float, int]] = []  # (t, cpu_s, rss_kb)
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> tuple[float, float, int]:
        s = (time.monotonic(), tree_cpu_s(self.pid), tree_rss_kb(self.pid))
        with self._lock:
            self.samples.append(s)
        return s

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2)

    def cpu_at(self, t: float) -> float:
        with self._lock:
            s = list(self.samples)
        if not s:
            return 0.0
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0, _), (t1, c1, _) in zip(s, s[1:]):
            if t0 <= t <= t1:
                return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
        return s[-1][1]

    def cores(self, t0: float, t1: float) -> float | None:
        if t1 <= t0:
            return None
        return (self.cpu_at(t1) - self.cpu_at(t0)) / (t1 - t0)

    def rss_max(self, t0: float = float("-inf"), t1: float = float("inf")) -> int:
        with self._lock:
            vals = [r for t, _, r in self.samples if t0 <= t <= t1]
        return max(vals) if vals else 0


class LineReader(threading.Thread):
    """Reads a child's stdout line by line into a list, so the driver can wait
    for a given line with a timeout."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.eof = False

    def run(self) -> None:
        try:
            for raw in self.stream:
                with self.cond:
                    self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                    self.cond.notify_all()
        except (OSError, ValueError):
            pass
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(self, pred, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            idx = 0
            while True:
                while idx < len(self.lines):
                    if pred(self.lines[idx]):
                        return self.lines[idx]
                    idx += 1
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot in tasks (user+nice+system+steal;
    irq and softirq are left out: loopback TCP processing of our own traffic lands
    there), from /proc/stat: the difference over a run, minus the server's and the
    generator's, is about what other processes on the machine used meanwhile."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (v[0] + v[1] + v[2] + v[7]) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0.0
