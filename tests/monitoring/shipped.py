"""The monitoring files gpud ships (scrape config, rules, dashboard), what their queries name, and the tools that
check them (promtool, prometheus: Debian's `prometheus` package, installed by scripts/setup.sh)."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.daemonproc import REPO, DaemonProcess

SCRAPE_CONFIG = REPO / "etc" / "prometheus" / "gpud.yml"
RULES = REPO / "etc" / "prometheus" / "gpud-rules.yml"
RULES_TEST = Path(__file__).with_name("gpud-rules.test.yml")
DASHBOARD_SCRIPT = REPO / "etc" / "grafana" / "dashboard.py"
DASHBOARD = REPO / "etc" / "grafana" / "gpud.json"
# What the dashboard's variables stand for when its queries are run outside Grafana.
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$job": "gpud", "$instance": ".*"}


def require_tool(name: str) -> str:
    """The tool's path; without it the test is skipped, or fails under GPUD_REQUIRE_ENGINES=1 (CI)."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install prometheus; scripts/setup.sh does)"
        if os.environ.get("GPUD_REQUIRE_ENGINES") == "1":
            pytest.fail(f"{reason} (GPUD_REQUIRE_ENGINES=1: the monitoring tests must run)")
        pytest.skip(reason)
    return path


def dashboard_module() -> ModuleType:
    """etc/grafana/dashboard.py, imported from its path (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("gpud_dashboard", DASHBOARD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def dashboard_queries() -> dict[str, str]:
    """Every PromQL query of the shipped dashboard (panel targets and variables), by where it is."""
    board = json.loads(DASHBOARD.read_text())
    queries = {
        f"panel {panel['title']!r} {target['refId']}": target["expr"]
        for panel in board["panels"]
        for target in panel.get("targets", [])
    }
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(SELECTOR, label) is Grafana's, not PromQL: its selector is the query.
            match = re.fullmatch(r"label_values\((.*), *\w+\)", variable["definition"])
            assert match, variable["definition"]
            queries[f"variable {variable['name']}"] = match.group(1)
    return queries


def with_variables(expr: str) -> str:
    """A dashboard query with its variables replaced, as Grafana would before sending it."""
    for name, value in DASHBOARD_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def rules() -> list[dict[str, Any]]:
    """Every rule (alerting and recording) of the shipped rules file."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def rule_queries() -> dict[str, str]:
    """Every rule's expression, by rule name."""
    return {rule.get("alert") or rule["record"]: rule["expr"] for rule in rules()}


# Quoted strings (label values, regexes), label matchers and range/subquery selectors: no metric names inside.
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]")
# `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_left (...)`, `group_right (...)`: label lists.
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_WORD = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                       "unless", "offset", "inf", "nan", "Inf", "NaN", "atan2"})  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names a PromQL expression reads; functions and keywords are left out."""
    text = _LABEL_LISTS.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub('""', expr)))
    names: set[str] = set()
    for match in _WORD.finditer(text):
        word, call = match.group(1), match.group(2)
        if call is None and word not in _KEYWORDS:
            names.add(word)
    return names


def declared_names(exposition: str) -> set[str]:
    """Every series name a Prometheus text exposition declares (by its `# TYPE` lines, so families that have no
    sample yet count), with the suffixes their type adds: _bucket/_sum/_count for histograms, _total for counters."""
    suffixes = {"histogram": ("", "_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
                "counter": ("", "_total")}  # fmt: skip
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + suffix for suffix in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def run_task(daemon: DaemonProcess, body: dict[str, Any], headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Submit a task and read its whole stream; the last event of each type, by type (task_finish, connection...)."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        conn.request("POST", "/api/tasks/submit", body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        raw = response.read().decode()
    finally:
        conn.close()
    assert response.status == 200, raw
    events: dict[str, dict[str, Any]] = {}
    for frame in raw.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        if "event" in fields and "data" in fields:
            events[fields["event"]] = json.loads(fields["data"])
    assert "task_finish" in events, raw[-2000:]
    return events
