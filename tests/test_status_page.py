"""The live status page of the admin port (``GET /``), rendered by a real headless Chromium.

A real server with clients chatting and idle clients answering pings; Chromium loads the
page, runs its script for a few seconds of virtual time, and the DOM it leaves must show
the numbers /stats and /metrics give. Chromium is Debian's ``chromium`` package: installed
here when missing and we are root, otherwise the test fails saying so (never skips).

``GOCHAT_UPDATE_SCREENSHOT=1 python -m pytest tests/test_status_page.py`` also refreshes
docs/status-page.png.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import gevent
import pytest
from conftest import INSTALL_TIMEOUT, ensure_tool
from gevent import subprocess as gsubprocess

from gochat import status_page
from gochat.client import Client

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser")
# Tests whose fixture may install a Debian package get room for it beyond pytest.ini's 120 s;
# everything else they wait for is bounded on its own.
INSTALLING = pytest.mark.timeout(2 * INSTALL_TIMEOUT + 120)
BROWSER_TIMEOUT = 60


@pytest.fixture(scope="module")
def chromium() -> str:
    return ensure_tool(CHROMIUM_NAMES, "chromium")


def browse(chromium: str, url: str, profile: Path, *args: str, budget_ms: int = 3000) -> str:
    """Run headless Chromium on ``url`` with a few seconds of virtual time; its stdout.

    gevent's subprocess, so the clients' greenlets in this process go on chatting and
    answering pings while the browser runs.
    """
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args, url]
    proc = gsubprocess.Popen(argv, stdout=gsubprocess.PIPE, stderr=gsubprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=BROWSER_TIMEOUT)
    except gsubprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"chromium did not finish within {BROWSER_TIMEOUT} s")
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{err.decode(errors='replace')[-3000:]}"
    return out.decode()


class ById(HTMLParser):
    """The text of every element that has an id, and the number of elements with each class."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.classes: dict[str, int] = {}
        self.open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        for cls in (attrs.get("class") or "").split():
            self.classes[cls] = self.classes.get(cls, 0) + 1
        if tag in ("meta", "link", "br", "img", "input"):
            return
        self.open.append((tag, attrs.get("id")))
        if attrs.get("id"):
            self.text.setdefault(attrs["id"], "")

    def handle_endtag(self, tag: str) -> None:
        while self.open:
            if self.open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, ident in self.open:
            if ident:
                self.text[ident] += data


def parse_dom(dom: str) -> ById:
    parser = ById()
    parser.feed(dom)
    return parser


def number(text: str) -> float:
    """A number as the page prints it: '1,234', '12.5', '3.2 MiB' (the unit is dropped)."""
    match = re.match(r"\s*([\d,]+(?:\.\d+)?)", text)
    assert match, f"not a number: {text!r}"
    return float(match.group(1).replace(",", ""))


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, dict(r.headers), r.read()


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


class Chatter:
    """Senders posting to two rooms in a loop and idle listeners (pinged, so the RTT histogram fills)."""

    def __init__(self, port: int, senders: int = 3, listeners: int = 3) -> None:
        self.clients: list[Client] = []
        self.senders: list[Client] = []
        for i in range(senders + listeners):
            c = Client("127.0.0.1", port)
            c.hello(nick=f"user{i}")
            c.join("lobby")
            c.join("ops" if i % 2 else "dev")
            self.clients.append(c)
            if i < senders:
                self.senders.append(c)
        self.sent = 0
        self.loop = gevent.spawn(self._chat)

    def _chat(self) -> None:
        while True:
            for c in self.senders:
                c.send_nowait({"type": "msg", "room": "lobby", "text": f"hello {self.sent}"})
                self.sent += 1
            for c in self.clients:  # keep the inboxes small: the test never reads them
                while c.inbox.qsize():
                    c.inbox.get_nowait()
            gevent.sleep(0.02)

    def close(self) -> None:
        self.loop.kill()
        for c in self.clients:
            c.close()


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        gevent.sleep(0.05)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# --------------------------------------------------------------------------- the page itself


def test_page_is_self_contained(start_server):
    s = start_server()
    status, headers, body = get(f"http://127.0.0.1:{s.admin_port}/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    # no outside assets: no src/href to another origin, no external stylesheet or script file
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads an outside asset"
    assert "<script src" not in page and 'rel="stylesheet"' not in page
    assert page.count("<script>") == 1 and page.count("<style>") == 1
    for path in ("/stats", "/ready", "/metrics"):
        assert f'"{path}"' in page  # the script polls these three
    assert get(f"http://127.0.0.1:{s.admin_port}/status")[2] == body
    # the other admin routes are untouched
    assert json.loads(get(f"http://127.0.0.1:{s.admin_port}/health")[2]) == {"ok": True}


@INSTALLING
def test_page_renders_live_numbers(start_server, chromium, tmp_path):
    s = start_server(heartbeat=0.2, rate=1000, burst=1000)
    admin = f"http://127.0.0.1:{s.admin_port}"
    chatter = Chatter(s.port)
    try:
        wait_for(lambda: metric(get(admin + "/metrics")[2].decode(), "gochat_heartbeat_rtt_seconds_count") > 0,
                 what="a heartbeat round trip")
        wait_for(lambda: s.stats()["messages_in"] > 20, what="messages")
        dom = browse(chromium, admin + "/", tmp_path / "profile", "--dump-dom")
        stats = s.stats()
        metrics_text = get(admin + "/metrics")[2].decode()
        shot = tmp_path / "status-page.png"
        # a longer run, so that the charts have a few seconds of history to show
        browse(chromium, admin + "/", tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,800",
               budget_ms=12000)
    finally:
        chatter.close()

    page = parse_dom(dom)
    t = page.text
    assert number(t["samples"]) >= 2, f"the script did not poll twice: {t.get('samples')!r}; banner {t.get('banner')!r}"
    assert t["banner"].strip() == "", t["banner"]
    # the static counts the page shows are those /stats gives (nothing connected or left meanwhile)
    assert number(t["connections"]) == stats["connections"] == 6
    assert number(t["sessions"]) == stats["sessions"] == 6
    assert number(t["rooms"]) == stats["rooms"] == 3
    assert number(t["max-connections"]) == stats["max_connections"]
    assert number(t["open-files-limit"]) == stats["open_files_limit"]
    assert number(t["awaiting"]) == 0
    assert 0 < number(t["open-files"]) <= stats["open_files_limit"]
    # Each of the six connections is either parked or has a reader greenlet in the pool, and
    # the page shows both from one /stats sample. Which ones are reading at that instant
    # depends on where the senders' messages are, so only the sum is certain (a reader that
    # has just parked stays in the pool until the hub unlinks it: the sum may exceed six).
    assert number(t["greenlets"]) >= 1
    assert number(t["parked"]) <= 6 and number(t["parked"]) + number(t["handler-greenlets"]) >= 6
    assert t["rss"].endswith("MiB") and 5 < number(t["rss"]) < 2048
    assert t["rss-per-conn"] == "whole process"  # per connection only from 100 connections on
    # cumulative counters: what the page read lies between zero and what /stats says now
    assert 0 < number(t["msg-total"]) <= stats["messages_in"]
    assert 0 < number(t["dlv-total"]) <= stats["deliveries"]
    # rates computed in the browser from successive samples: 3 senders -> 6 members of lobby
    assert number(t["msg-rate"]) > 0 and number(t["dlv-rate"]) > number(t["msg-rate"])
    assert t["ready"] == "ready" and t["broker"] == "memory" and t["pid"] == f"pid {stats['pid']}"
    # the heartbeat RTT histogram parsed from /metrics: one row per bucket, counts adding up
    buckets = [line for line in metrics_text.splitlines() if line.startswith("gochat_heartbeat_rtt_seconds_bucket")]
    assert page.classes.get("lbl") == len(buckets) == 13
    assert 0 < number(t["rtt-count"]) <= metric(metrics_text, "gochat_heartbeat_rtt_seconds_count")
    assert t["rtt-p50"].endswith("ms") and t["rtt-p99"].endswith(("ms", " s"))
    assert "workers-card" in t and page.classes.get("show") is None  # no workers table on a single process

    assert png_size(shot) == (1200, 800)
    assert shot.stat().st_size > 20_000, "the screenshot looks blank"
    if os.environ.get("GOCHAT_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "status-page.png")


@INSTALLING
def test_page_behind_the_supervisor(start_server, chromium, tmp_path):
    """The supervisor's /stats (totals and a workers list) and /metrics (a worker label on
    every series), from its own admin app over two real servers, with the page at /.

    A real Supervisor object, never run: its workers are pointed at two servers started
    here, and its admin app answers everything but ``/`` (``status_page.app`` mounted
    in front of it, as the supervisor's own admin app should do).
    """
    from gevent.pywsgi import WSGIServer

    from gochat.config import Config
    from gochat.supervisor import Supervisor

    servers = [start_server(heartbeat=0.2), start_server(heartbeat=0.2)]
    group = Supervisor(Config(host="127.0.0.1", port=0, admin_port=0, workers=2, broker="redis://127.0.0.1:1/0"), [])
    group.reservation.close()  # the port it reserved for workers that never start
    for worker, server in zip(group.workers, servers):
        worker.admin_port = server.admin_port

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/":
            return status_page.app(environ, start_response)
        return group._admin_app(environ, start_response)

    clients = []
    http = WSGIServer(("127.0.0.1", 0), app, log=None)
    http.start()
    try:
        for i, n in ((0, 2), (1, 3)):
            for k in range(n):
                c = Client("127.0.0.1", servers[i].port)
                c.hello(nick=f"w{i}u{k}")
                c.join("lobby")
                clients.append(c)
        wait_for(lambda: all(metric(s.admin("/metrics")[1], "gochat_heartbeat_rtt_seconds_count") > 0
                             for s in servers), what="heartbeats on both workers")
        dom = browse(chromium, f"http://127.0.0.1:{http.address[1]}/", tmp_path / "profile", "--dump-dom")
        per_worker = [s.stats() for s in servers]
    finally:
        for c in clients:
            c.close()
        http.stop(timeout=1)

    page = parse_dom(dom)
    t = page.text
    assert number(t["samples"]) >= 2 and t["banner"].strip() == ""
    assert number(t["connections"]) == 5
    assert number(t["max-connections"]) == sum(w["max_connections"] for w in per_worker)  # summed from workers
    assert t["rss"].endswith("MiB")  # the supervisor's totals lack rss_bytes: summed from its workers
    assert t["pid"] == "2 workers" and t["ready"] == "ready"
    assert "workers-card" in t and page.classes.get("show") == 1
    assert len(re.findall(r"<tr>", dom)) == 1 + 2  # the header and one row per worker
    assert page.classes.get("lbl") == 13  # buckets summed over the worker label, not one row per series
    assert number(t["rtt-count"]) >= 2
    assert html.unescape(t["broker"]) == "memory"
