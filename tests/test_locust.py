"""The locust load test (loadtest/locustfile.py) against a real server, headless, 10 seconds.

Locust monkey-patches whatever process imports it, so it runs only as a subprocess here.
"""
from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadtest" / "locustfile.py"


def test_locust_headless_run(start_server, tmp_path: Path) -> None:
    server = start_server()  # default limits (rate 20/s, burst 40): the load test stays under them
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", "20", "-r", "10", "-t", "10s", "--host", f"127.0.0.1:{server.port}",
            "--chat-rooms", "4", "--chat-rate", "1",
            "--csv", str(tmp_path / "run"), "--only-summary", "--exit-code-on-error", "1"]
    run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output

    with open(tmp_path / "run_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    failures = (tmp_path / "run_failures.csv").read_text()
    assert int(rows["Aggregated"]["Failure Count"]) == 0, failures + output
    count = {name: int(rows[name]["Request Count"]) if name in rows else 0
             for name in ("login", "msg ack", "delivery")}
    assert count["login"] == 20, (count, output)
    # 20 users at 1 msg/s for ~9 s after the ramp-up; 5 members per room see each msg
    assert count["msg ack"] >= 100, (count, output)
    assert count["delivery"] > 2 * count["msg ack"], (count, output)
    assert "server error" not in rows, output

    stats = server.stats()  # the server's own view agrees: every acked msg was posted
    assert stats["messages_in"] >= count["msg ack"]
    deadline = time.monotonic() + 5  # and every user said bye (the server may still be closing)
    while stats["sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = server.stats()
    assert stats["sessions"] == 0, stats
