"""The `gochat` command as people run it: real processes, a real terminal (pty)."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

GOCHAT = [sys.executable, "-m", "gochat"]


def run(*args, env=None, timeout=30):
    return subprocess.run(GOCHAT + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("gochat, version ")


def test_config_layers_flag_over_env_over_file_over_profile(tmp_path):
    conf = tmp_path / "gochat.toml"
    conf.write_text('heartbeat = 12.5\nrate = 7\nlog_format = "text"\nmax_connections = 55\n')
    result = run("config", "show", "--config", str(conf), "--profile", "prod", "--rate", "9",
                 env={"GOCHAT_MAX_CONNECTIONS": "66"})
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert rows["heartbeat"] == ["12.5", "file", str(conf)]
    assert rows["rate"] == ["9.0", "flag"]
    assert rows["max_connections"] == ["66", "environment"]
    assert rows["log_format"] == ["text", "file", str(conf)]  # the file overrides the profile
    assert rows["log_level"] == ["info", "profile", "prod"]
    assert rows["port"] == ["9000", "default"]


def test_bad_configuration_is_refused_before_start(tmp_path):
    for args, env, words in (
        (["--heartbeat", "soon"], {}, "heartbeat"),
        (["--rate", "-1"], {}, "rate"),
        ([], {"GOCHAT_MAX_CONNECTIONS": "lots"}, "max_connections"),
        (["--auth", "jwt"], {}, "jwt_secret"),
        (["--workers", "2"], {}, "shared broker"),
    ):
        result = run("serve", "--port", "0", "--admin-port", "0", *args, env=env)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
    conf = tmp_path / "bad.toml"
    conf.write_text("no_such_key = 1\n")
    result = run("serve", "--config", str(conf))
    assert result.returncode == 2 and "unknown key 'no_such_key'" in result.stderr


class Terminal:
    """`gochat connect` on a pseudo-terminal, read and typed like a person would."""

    def __init__(self, *args):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(GOCHAT + ["connect", *args], stdin=slave, stdout=slave, stderr=slave,
                                     close_fds=True)
        os.close(slave)
        self.screen = ""

    def type(self, line):
        os.write(self.master, line.encode() + b"\n")

    def wait_for(self, text, timeout=10.0):
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"{text!r} never appeared; screen:\n{self.screen}")
            try:
                self.screen += os.read(self.master, 4096).decode(errors="replace")
            except OSError:
                raise AssertionError(f"terminal closed before {text!r}; screen:\n{self.screen}") from None
        return self.screen

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def test_connect_chats_with_a_text_mode_user(start_server, raw):
    s = start_server()
    term = Terminal(f"127.0.0.1:{s.port}", "--nick", "alice")
    try:
        term.wait_for("* joined lobby")
        nc = raw(s.port, "text")  # what `nc 127.0.0.1 PORT` sends and sees
        nc.send_raw(b"bob\n")
        assert nc.read() == "* welcome bob"
        term.wait_for("* bob joined lobby")
        nc.send_raw(b"hi alice\n")
        term.wait_for("[lobby] bob: hi alice")
        term.type("hello bob")
        nc.expect_line("[lobby] alice: hello bob")
        term.wait_for("[lobby] alice: hello bob")
        term.type("/msg bob psst")
        nc.expect_line("[dm] alice: psst")
        term.type("/who")
        term.wait_for("* members of lobby: alice bob")
        term.type("/join dev")
        term.wait_for("* joined dev")
        term.type("/nosuch")
        term.wait_for("! bad_request: unknown command /nosuch")
        term.type("/quit")
        nc.expect_line("* alice is offline")
        assert term.proc.wait(10) == 0
    finally:
        term.close()
