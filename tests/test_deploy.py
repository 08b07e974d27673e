"""The deployment files: scripts/tune-sysctl.sh, deploy/ (systemd, Kubernetes, Prometheus, Grafana).

Every metric an alert or a dashboard panel reads must exist in a live server's /metrics
(a server with traffic, so labelled series exist), every label value they match must be
one gochat emits, the rules must pass ``promtool check rules`` and their unit tests
(Debian's ``prometheus`` package: installed here when missing and we are root, otherwise
the test fails saying so), and the Kubernetes and systemd stop timeouts must outlast the drain.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import INSTALL_TIMEOUT, ensure_tool

from gochat.config import PROFILES, SETTINGS, load
from gochat.conn import CloseReason
from gochat.protocol import ERRORS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCRIPT = ROOT / "scripts" / "tune-sysctl.sh"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "gochat-dashboard.json"
K8S = DEPLOY / "k8s"
UNIT = DEPLOY / "systemd" / "gochat.service"
UNIT_ENV = DEPLOY / "systemd" / "gochat.env"
OPERATIONS = ROOT / "docs" / "operations.md"
# Tests whose fixture may install a Debian package get room for it beyond pytest.ini's 120 s;
# everything else they wait for is bounded on its own.
INSTALLING = pytest.mark.timeout(2 * INSTALL_TIMEOUT + 120)

# Series Prometheus itself makes for every target, allowed in rules beside gochat's own.
PROMETHEUS_SERIES = {"up"}
# Connection rejections have their own reasons beside the close reasons.
REJECT_REASONS = {"max_connections", "max_conns_per_ip"}
TEARDOWN_S = 5  # after drain_timeout: joining handlers (2 s), killing stragglers (1 s), hub and broker


@pytest.fixture(scope="module")
def promtool() -> str:
    return ensure_tool(("promtool",), "prometheus")


# --------------------------------------------------------------------------- PromQL helpers

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan", "atan2"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels and durations left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        name = match.group(0)
        if name.lower() in PROMQL_WORDS or re.match(r"\s*\(", text[match.end():]):
            continue
        names.add(name)
    return names


def promql_label_values(expr: str, label: str) -> set[str]:
    """Values a label is matched against (=, !=, =~, !~; alternatives of a regex split on |)."""
    values = set()
    for op, value in re.findall(rf'\b{label}\s*(=~|!~|!=|=)\s*"([^"]*)"', expr):
        values.update(value.split("|") if "~" in op else [value])
    return values


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels: list) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return exprs


def dashboard_variable_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    names = set()
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        names.update(re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)", query))
    return names


def as_plain_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in, for promtool."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
            .replace("$job", "gochat").replace("$instance", ".*"))


# --------------------------------------------------------------------------- a live server's metrics


@pytest.fixture(scope="module")
def live_metrics() -> tuple[set[str], set[str]]:
    """(sample names, family names) of a server that saw chat, pings, a close, an error and a rejection."""
    import time

    import gevent

    from conftest import RawClient, ServerProcess
    from gochat.client import Client

    server = ServerProcess(heartbeat=0.2, max_connections=3)
    try:
        alice, bob = Client("127.0.0.1", server.port), Client("127.0.0.1", server.port)
        alice.hello(nick="alice"), bob.hello(nick="bob")
        alice.join("lobby"), bob.join("lobby")
        alice.send("lobby", "hello")
        bad = RawClient(server.port)
        bad.send_raw(b"{not json}\n")
        bad.expect("error", code="bad_json")
        extra = RawClient(server.port)  # the fourth connection: over max_connections
        extra.send({"type": "hello", "nick": "carol"})
        extra.expect("error", code="too_many_connections")
        bad.close()
        deadline = time.monotonic() + 10
        while True:
            text = server.admin("/metrics")[1]
            if ("gochat_heartbeat_rtt_seconds_count 0.0" not in text and "gochat_connections_closed_total{" in text):
                break
            assert time.monotonic() < deadline, "no heartbeat or close recorded:\n" + text
            gevent.sleep(0.05)
        alice.close(), bob.close(), extra.close()
    finally:
        server.stop()
    samples = {m.group(1) for m in re.finditer(r"^(gochat_\w+)(?:\{[^}]*\})? ", text, re.M)}
    families = set(re.findall(r"^# TYPE (gochat_\w+) ", text, re.M))
    return samples, families


def test_alert_and_dashboard_metrics_exist(live_metrics):
    samples, _ = live_metrics
    known = samples | PROMETHEUS_SERIES
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in promql_metrics(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for expr in dashboard_exprs():
        for name in promql_metrics(expr):
            used.setdefault(name, set()).add(f"dashboard: {expr}")
    for name in dashboard_variable_metrics():
        used.setdefault(name, set()).add("dashboard variable")
    unknown = {name: sorted(where) for name, where in used.items() if name not in known}
    assert not unknown, f"metrics not in /metrics: {unknown}\nknown: {sorted(known)}"
    # the extraction found what it should: these are certainly used
    assert {"gochat_broker_up", "gochat_connections_closed_total", "gochat_heartbeat_rtt_seconds_bucket",
            "gochat_max_connections", "up"} <= set(used)
    assert len([n for n in used if n.startswith("gochat_")]) >= 20


def test_matched_label_values_are_ones_gochat_emits():
    exprs = [r["expr"] for r in alert_rules()] + dashboard_exprs()
    reasons = set().union(*(promql_label_values(e, "reason") for e in exprs))
    codes = set().union(*(promql_label_values(e, "code") for e in exprs))
    assert reasons and codes
    assert reasons <= {r.value for r in CloseReason} | REJECT_REASONS, reasons
    assert codes <= set(ERRORS), codes


@INSTALLING
def test_promtool_checks_and_tests_the_rules(promtool, tmp_path):
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout
    done = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    # every alert has a severity, a summary, and a runbook section in docs/operations.md
    docs = OPERATIONS.read_text().lower()
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert f"### {rule['alert'].lower()}" in docs and anchor == rule["alert"].lower(), rule["alert"]


@INSTALLING
def test_promtool_parses_every_dashboard_query(promtool, tmp_path):
    """The dashboard's PromQL, variables filled in, as recording rules: promtool parses each one."""
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"gochat_dashboard:query_{i}",
                                                          "expr": as_plain_promql(e)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert "$instance" in target["expr"] and target["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables


def test_operations_doc_lists_every_metric(live_metrics):
    _, families = live_metrics
    docs = OPERATIONS.read_text()
    missing = sorted(name for name in families if f"`{name}`" not in docs)
    assert not missing, f"docs/operations.md does not describe these metrics: {missing}"


# --------------------------------------------------------------------------- YAML and JSON files


def test_every_deploy_file_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml", ".json"))
    assert len(files) >= 8, files
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert docs, f"{path} is empty"


# --------------------------------------------------------------------------- Kubernetes


def k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                objects[doc["kind"]] = doc
    return objects


def test_k8s_manifests():
    objects = k8s_objects()
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= set(objects)
    env = objects["ConfigMap"]["data"]
    assert all(isinstance(v, str) for v in env.values()), "ConfigMap values must be strings"
    # every GOCHAT_* key is a real setting with a valid value (the profile is the CLI's own variable)
    assert env.pop("GOCHAT_PROFILE") in PROFILES
    assert all(key.startswith("GOCHAT_") for key in env)
    known = {s.envvar for s in SETTINGS}
    assert set(env) <= known, f"unknown settings: {set(env) - known}"
    config = load("prod", environ=env)
    assert config.admin_host == "0.0.0.0", "probes come from outside the pod: the admin port must not be loopback"
    assert config.broker.startswith("redis://"), "replicas need a shared broker"
    assert 0 < config.max_conns_per_ip < config.max_connections, "one address must not fill a pod"

    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["enableServiceLinks"] is False, "service links would set GOCHAT_PORT=tcp://..."
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"chat": config.port, "admin": config.admin_port}
    assert container["envFrom"][0]["configMapRef"]["name"] == objects["ConfigMap"]["metadata"]["name"]

    def probe_target(probe: dict) -> tuple[str, int]:
        port = probe["httpGet"]["port"]
        return probe["httpGet"]["path"], ports.get(port, port)

    assert probe_target(container["livenessProbe"]) == ("/health", config.admin_port)
    assert probe_target(container["readinessProbe"]) == ("/ready", config.admin_port)
    # the grace period covers the preStop delay, the whole drain and the teardown after it
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + config.drain_timeout + TEARDOWN_S, (grace, config.drain_timeout)
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    service = objects["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    # the per-address cap needs the clients' own addresses, not a node's (SNAT)
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["chat"], "only the chat port is exposed"
    pdb = objects["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                         if p.name != "kustomization.yaml")


# --------------------------------------------------------------------------- systemd


def read_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    unit.optionxform = str
    unit.read_string(UNIT.read_text())
    return unit


def test_systemd_unit():
    unit = read_unit()
    service = unit["Service"]
    env = {}
    for line in UNIT_ENV.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    assert set(env) <= {s.envvar for s in SETTINGS}, env
    config = load("prod", environ=env)
    assert service["EnvironmentFile"].lstrip("-") == "/etc/gochat/gochat.env"
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert float(service["TimeoutStopSec"]) > config.drain_timeout + TEARDOWN_S
    assert int(service["LimitNOFILE"]) >= config.max_connections + 100
    assert 0 < config.max_conns_per_ip < config.max_connections, "one address must not fill the node"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert "gochat serve" in service["ExecStart"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    text = UNIT.read_text().replace("/opt/gochat/bin/gochat", shutil.which("true") or "/bin/true")
    unit = tmp_path / "gochat.service"
    unit.write_text(text)
    done = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if "gochat.service" in line and not re.search(r"(Failed to (connect|create)|bus)", line)]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


# --------------------------------------------------------------------------- tune-sysctl.sh

SYSCTL_KEYS = ("net.core.somaxconn", "fs.file-max", "fs.nr_open", "net.ipv4.ip_local_port_range",
               "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.core.netdev_max_backlog",
               "net.ipv4.tcp_max_syn_backlog", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_tw_reuse")
PERSISTED = (Path("/etc/sysctl.d/90-gochat.conf"), Path("/etc/security/limits.d/90-gochat.conf"))


def proc_value(key: str) -> str | None:
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        return " ".join(path.read_text().split())
    except OSError:
        return None


def run_script(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, **kwargs)


def file_state(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def test_tune_sysctl_dry_run_prints_everything_and_changes_nothing():
    before = {key: proc_value(key) for key in SYSCTL_KEYS}
    files_before = [file_state(p) for p in PERSISTED]
    done = run_script()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for key in SYSCTL_KEYS:
        (line,) = [line for line in lines if line.split()[:1] == [key]]
        if before[key] is None:
            assert "not on this kernel" in line
        else:
            current, recommended = (part.strip() for part in line[len(key):].split("->", 1))
            assert current.startswith(before[key]), (line, before[key])
            assert re.match(r"[\d ]+ +(ok|change):", recommended), line
    assert any(line.startswith("nofile") and "->" in line for line in lines)
    assert "Dry run: nothing changed" in done.stdout
    assert {key: proc_value(key) for key in SYSCTL_KEYS} == before
    assert [file_state(p) for p in PERSISTED] == files_before


def test_tune_sysctl_never_lowers_and_writes_files_on_request(tmp_path):
    done = run_script("--write", str(tmp_path))
    assert done.returncode == 0, done.stderr
    sysctl = {}
    for line in (tmp_path / "90-gochat-sysctl.conf").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" = ")
            sysctl[key] = value
    assert set(SYSCTL_KEYS) <= set(sysctl) | {k for k in SYSCTL_KEYS if proc_value(k) is None}
    for key in ("net.core.somaxconn", "fs.file-max", "fs.nr_open", "net.core.netdev_max_backlog",
                "net.ipv4.tcp_max_syn_backlog"):
        if proc_value(key) is not None:
            assert int(sysctl[key]) >= int(proc_value(key)), f"{key} would be lowered"
    assert int(sysctl["net.core.somaxconn"]) >= 4096 and int(sysctl["fs.nr_open"]) >= 1048576
    assert int(sysctl["net.ipv4.tcp_fin_timeout"]) <= 30
    low, high = map(int, sysctl["net.ipv4.ip_local_port_range"].split())
    assert 9001 < low < high <= 65535, "ephemeral ports must stay clear of gochat's own ports"
    limits = (tmp_path / "90-gochat-limits.conf").read_text()
    assert re.search(r"^\*\s+soft\s+nofile\s+\d+$", limits, re.M) and re.search(r"^\*\s+hard\s+nofile", limits, re.M)


def test_tune_sysctl_help_and_bad_options():
    done = run_script("--help")
    assert done.returncode == 0 and "--apply" in done.stdout and "Usage" in done.stdout
    done = run_script("--frobnicate")
    assert done.returncode == 2 and "unknown option" in done.stderr
    setpriv = shutil.which("setpriv")
    if setpriv and os.geteuid() == 0:  # --apply refuses to run unprivileged, before touching anything
        done = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(SCRIPT),
                               "--apply"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "must run as root" in done.stderr
    assert subprocess.run(["bash", "-n", str(SCRIPT)], timeout=30).returncode == 0
