"""A real Prometheus server (Debian's `prometheus`) for a test: its own storage and loopback port, the shipped
scrape configuration with only the target, the key file and the intervals changed, and its HTTP API."""

from __future__ import annotations

import json
import math
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.daemonproc import free_port, stop_process
from tests.monitoring.shipped import RULES, SCRAPE_CONFIG, require_tool
from tests.waiting import wait_for

# Short enough for a test to see several scrapes and rule evaluations in a few seconds.
INTERVAL = "1s"


def derived_config(target: str, key_file: Path) -> dict[str, Any]:
    """etc/prometheus/gpud.yml with only the target, the key file and the intervals changed."""
    config: dict[str, Any] = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"].update(scrape_interval=INTERVAL, scrape_timeout=INTERVAL, evaluation_interval=INTERVAL)
    (job,) = config["scrape_configs"]
    job["authorization"]["credentials_file"] = str(key_file)
    job["static_configs"] = [{"targets": [target]}]
    return config


class Prometheus:
    """`prometheus` started on a free loopback port with the derived configuration (the shipped rules file is
    copied beside it, where the configuration's relative `rule_files` entry finds it)."""

    def __init__(self, tmp: Path, target: str, key_file: Path) -> None:
        self.dir = tmp / "prometheus"
        self.dir.mkdir()
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(derived_config(target, key_file), sort_keys=False))
        (self.dir / RULES.name).write_text(RULES.read_text())
        self.port = free_port()
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def check_config(self) -> str:
        """`promtool check config` on the derived configuration: its output; raises when it fails."""
        done = subprocess.run(
            [require_tool("promtool"), "check", "config", str(self.config)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    def start(self) -> Prometheus:
        """Start it and wait until it is ready."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    require_tool("prometheus"),
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, "Prometheus ready", 30)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    @property
    def log(self) -> str:
        """What Prometheus logged so far."""
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer (an error answer raises with its message)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        assert body["status"] == "success", (params, body)
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: each series' labels and value."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(series["metric"], float(series["value"][1])) for series in data["result"]]

    def value(self, expr: str) -> float | None:
        """The one value an instant query gives (None when it gives no series)."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return result[0][1] if result else None

    def finite(self, expr: str) -> float | None:
        """The query's one value when it is a number (not NaN), else None."""
        value = self.value(expr)
        return value if value is not None and not math.isnan(value) else None

    def stop(self) -> None:
        """Stop the Prometheus this object started (SIGTERM, then SIGKILL)."""
        if self.proc is not None:
            stop_process(self.proc, grace=20)
