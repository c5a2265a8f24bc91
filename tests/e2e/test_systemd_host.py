"""gpud installed by `scripts/install.sh --wheelhouse` on a Debian 12 host booted with systemd, driven with systemctl,
journalctl and gpuctl.

The host is a container (`podman run --systemd=always --privileged`: privileged so that systemd really applies the
unit's sandbox). Its workers run on the test machine's Podman through the engine socket mounted at
/run/podman/podman.sock, and /var/lib/gpud is the test machine's own, so the paths gpud hands the engine are host
paths. The tests run in file order on one host: install, then each behaviour, then upgrade and uninstall.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    REPO,
    build_images,
    engine_socket,
    need_tools,
    reset_host_state,
    run,
    sessions_of,
    unique,
    worker_containers,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.podman, pytest.mark.timeout(600)]

IMAGE = "localhost/gpud-e2e-host:latest"
SOCKET = "/run/gpud/gpud.sock"


class Host:
    """The booted systemd container: commands inside it, unit properties, the journal."""

    def __init__(self, name: str) -> None:
        self.name = name

    def sh(self, script: str, check: bool = True, user: str | None = None, timeout: float = 120) -> Any:
        """Run a bash script inside (as root, or as `user` through runuser)."""
        command = ["runuser", "-u", user, "--", "bash", "-c", script] if user else ["bash", "-c", script]
        return run("podman", "exec", self.name, *command, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show` properties of a unit."""
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """Journal entries as JSON objects, oldest first."""
        out = self.sh("journalctl --no-pager -o json " + " ".join(args)).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def gpud_entries(self) -> list[dict[str, Any]]:
        """What gpud itself wrote (its stderr, through journald) and what systemd said about gpud.service."""
        return self.journal("-u", "gpud.service")

    def gpuctl_json(self, *args: str) -> Any:
        """`gpuctl <args> -o json`, parsed."""
        return json.loads(self.sh("gpuctl " + " ".join(args) + " -o json").stdout)

    def main_pid(self) -> int:
        """gpud's pid as systemd knows it (0 when not running)."""
        return int(self.show("gpud.service", "MainPID")["MainPID"])

    def write(self, path: str, text: str) -> None:
        """Write a file inside."""
        script = f'mkdir -p "$(dirname {path})" && cat >{path}'
        subprocess.run(["podman", "exec", "-i", self.name, "bash", "-c", script], input=text, text=True,
                       check=True, capture_output=True)  # fmt: skip

    def read(self, path: str) -> str:
        """Read a file inside."""
        return str(self.sh(f"cat {path}").stdout)


def message(entry: dict[str, Any]) -> str:
    """A journal entry's message as text (journald gives bytes as a list of ints)."""
    value = entry.get("MESSAGE", "")
    return bytes(value).decode(errors="replace") if isinstance(value, list) else str(value)


@pytest.fixture(scope="module")
def host(wheelhouse: Path, host_state_dir: Path) -> Iterator[Host]:
    """A booted Debian host with gpud installed from the wheelhouse; removed (workers first) at the end."""
    need_tools("podman", "mmdebstrap")
    podman_socket = engine_socket("podman")
    build_images("tests/e2e/host-image", engines="podman")
    reset_host_state(REPO / "examples" / "models" / "demo-text")
    name = unique("gpud-e2e-host")
    run(
        "podman", "run", "-d", "--name", name, "--systemd=always", "--privileged", "--network=none",
        "-v", f"{REPO}:/src:ro", "-v", f"{wheelhouse}:/wheelhouse:ro",
        "-v", f"{podman_socket}:/run/podman/podman.sock", "-v", f"{host_state_dir}:{host_state_dir}",
        IMAGE,
    )  # fmt: skip
    box = Host(name)
    try:
        wait_for(
            lambda: box.sh("systemctl is-system-running", check=False).stdout.strip() in ("running", "degraded"),
            "the host's systemd to finish booting",
            timeout=60,
            interval=0.5,
        )
        # Stand-ins for an NVIDIA driver's device nodes (no driver behind them): the unit must bind them in.
        box.sh("mknod -m 666 /dev/nvidiactl c 195 255 && mknod -m 666 /dev/nvidia0 c 195 0")
        yield box
    finally:
        run("podman", "exec", name, "systemctl", "stop", "gpud.service", check=False, timeout=90)
        run("podman", "rm", "-f", "-t", "5", name, check=False)


@pytest.fixture(scope="module")
def installed(host: Host) -> Host:
    """The host after `scripts/install.sh --wheelhouse`, as the operator runs it."""
    result = host.sh("/src/scripts/install.sh --wheelhouse /wheelhouse", timeout=300)
    assert "installed gpud" in result.stderr
    return host


def test_install_puts_gpud_on_path_and_starts_after_ready(installed: Host) -> None:
    host = installed
    assert host.sh("command -v gpud gpuctl").stdout.split() == ["/usr/local/bin/gpud", "/usr/local/bin/gpuctl"]
    assert host.sh("readlink -f /usr/local/bin/gpud").stdout.startswith("/opt/gpud/releases/")
    state = host.show("gpud.service", "ActiveState", "Type", "NRestarts", "UnitFileState", "ExecMainStartTimestamp")
    assert state["ActiveState"] == "active" and state["Type"] == "notify" and state["UnitFileState"] == "enabled"
    assert host.show("gpud.socket", "ActiveState", "UnitFileState") == {
        "ActiveState": "active",
        "UnitFileState": "enabled",
    }
    # Type=notify: systemd said "Started" only after gpud served (it logs its listeners before READY=1).
    entries = host.gpud_entries()
    serving = next(e for e in entries if "public API on http://" in message(e))
    started = next(e for e in entries if message(e).startswith("Started gpud.service"))
    assert int(serving["__MONOTONIC_TIMESTAMP"]) < int(started["__MONOTONIC_TIMESTAMP"])
    # No NVML in this host: the shipped configuration falls back to a static GPU, and says so.
    assert any("declaring static GPU(s) 0" in message(e) for e in entries)
    status = host.gpuctl_json("status")
    assert status["gpu_backend"] == "static" and status["runtime"]["name"] == "podman"
    assert status["runtime"]["reachable"] is True, status


def test_install_writes_an_api_key_that_scrapes_metrics(installed: Host) -> None:
    """The shipped Prometheus config sends /etc/gpud/api-key as a Bearer token: the install must make that work."""
    host = installed
    assert host.sh("stat -c '%a %U' /etc/gpud/api-key").stdout.split() == ["600", "root"]  # no prometheus group here
    scrape = (
        "import sys, urllib.request, urllib.error\n"
        "key = open('/etc/gpud/api-key').read().strip()\n"
        "for headers in ({'Authorization': 'Bearer ' + key}, {}):\n"
        "    request = urllib.request.Request('http://127.0.0.1:8001/metrics', headers=headers)\n"
        "    try:\n"
        "        print(urllib.request.urlopen(request, timeout=10).status)\n"
        "    except urllib.error.HTTPError as exc:\n"
        "        print(exc.code)\n"
    )
    assert host.sh(f'python3 -c "{scrape}"').stdout.split() == ["200", "401"]
    assert host.sh("test -f /usr/local/share/doc/gpud/prometheus/gpud.yml && echo ok").stdout.strip() == "ok"


def test_sandbox_is_applied(installed: Host) -> None:
    host = installed
    pid = host.main_pid()
    proc = dict(
        line.split(":\t", 1) for line in host.sh(f"cat /proc/{pid}/status").stdout.splitlines() if ":\t" in line
    )
    # CAP_CHOWN (0), CAP_DAC_OVERRIDE (1), CAP_FOWNER (3): nothing else, ever.
    assert int(proc["CapBnd"], 16) == 0b1011 and proc["NoNewPrivs"].strip() == "1" and proc["Seccomp"].strip() == "2"
    devices = set(host.sh(f"nsenter -t {pid} -m ls /dev").stdout.split())
    assert {"nvidiactl", "nvidia0", "null", "urandom"} <= devices, devices
    assert not {name for name in devices if name.startswith(("sd", "vd", "nvme", "loop", "tty1"))}, devices
    assert host.sh(f"nsenter -t {pid} -m touch /etc/gpud/x", check=False).returncode != 0  # ProtectSystem=strict
    score = host.sh("systemd-analyze security gpud.service --no-pager | tail -1").stdout
    assert float(score.split("level for gpud.service:")[1].split()[0]) <= 2.0, score


def test_socket_mode_owner_and_group_access(installed: Host) -> None:
    host = installed
    assert host.sh(f"stat -c '%a %U %G' {SOCKET}").stdout.strip() == "660 root gpud"
    host.sh("useradd --create-home --groups gpud alice && useradd --create-home bob")
    member = host.sh("gpuctl status -o json", user="alice", check=False)
    assert member.returncode == 0, member.stderr
    stranger = host.sh("gpuctl status -o json", user="bob", check=False)
    assert stranger.returncode == 3 and "ermission" in stranger.stderr, stranger


def start_session(host: Host) -> str:
    """Run one task on a new session of the demo model and return the session's id."""
    done = host.sh("gpuctl submit demo-text stream --meta max_tokens=3 --meta delay=0", check=False)
    assert done.returncode == 0, done.stderr
    sessions = sessions_of(host.gpuctl_json("sessions", "ls"))
    live = [s for s in sessions if s.get("state") not in ("ended", "failed")]
    assert len(live) == 1, sessions
    return str(live[0]["session_id"])


def test_reload_applies_presets_without_dropping_the_session(installed: Host) -> None:
    host = installed
    session = start_session(host)
    containers = worker_containers("podman", f"gpud.session_id={session}")
    assert len(containers) == 1, containers  # a sibling container on the host's engine
    presets = host.read("/etc/gpud/models.yaml")
    added = presets.replace(
        "    oneoff:\n", "    stream-again:\n" + preset_block(presets, "stream") + "    oneoff:\n", 1
    )
    host.write("/etc/gpud/models.yaml", added)
    before = len(host.gpud_entries())
    host.sh("systemctl reload gpud.service")
    after = host.gpud_entries()[before:]
    reloaded = next(i for i, e in enumerate(after) if "reloaded: settings changed" in message(e))
    said = next(i for i, e in enumerate(after) if message(e).startswith("Reloaded gpud.service"))
    assert reloaded < said, [message(e) for e in after]  # systemd reports the reload once gpud has done it
    assert "demo-text/stream-again" in message(after[reloaded])
    assert any(p.get("preset") == "stream-again" for p in flatten_presets(host.gpuctl_json("presets")))
    again = host.sh(f"gpuctl submit demo-text stream --session {session} --meta max_tokens=2 --meta delay=0")
    assert again.returncode == 0
    assert worker_containers("podman", f"gpud.session_id={session}") == containers  # the same worker


def test_refused_config_fails_the_reload_and_keeps_serving(installed: Host) -> None:
    host = installed
    good = host.read("/etc/gpud/gpud.yaml")
    host.write("/etc/gpud/gpud.yaml", good + "bogus_key: 1\n")
    try:
        refused = host.sh("systemctl reload gpud.service", check=False)
        assert refused.returncode != 0
        assert host.show("gpud.service", "ActiveState")["ActiveState"] == "active"
        assert host.gpuctl_json("status")["status"] in ("ok", "degraded")
        errors = [e for e in host.journal("-u", "gpud.service", "-p", "err") if "bogus_key" in message(e)]
        assert errors and all(e["PRIORITY"] == "3" for e in errors), errors
    finally:
        host.write("/etc/gpud/gpud.yaml", good)


def test_journal_priorities(installed: Host) -> None:
    entries = [e for e in installed.gpud_entries() if e.get("SYSLOG_IDENTIFIER") == "gpud"]
    by_text = {message(e): e["PRIORITY"] for e in entries}
    assert any(
        text.startswith("gpud.daemon.run: gpud ") and text.endswith(" ready") and p == "6"
        for text, p in by_text.items()
    )
    assert any("falling back to the static GPU backend" in text and p == "4" for text, p in by_text.items())
    info_lines = installed.journal("-u", "gpud.service", "-p", "err")
    assert not any(message(e).endswith(" ready") for e in info_lines)


def test_stop_removes_workers_and_keeps_the_socket(installed: Host) -> None:
    host = installed
    sessions = [s["session_id"] for s in sessions_of(host.gpuctl_json("sessions", "ls")) if s.get("state") != "ended"]
    assert sessions, "the reload test leaves a live session"
    host.sh("systemctl stop gpud.service")
    for session in sessions:
        assert worker_containers("podman", f"gpud.session_id={session}") == []
    assert host.show("gpud.socket", "ActiveState")["ActiveState"] == "active"
    assert host.sh(f"test -S {SOCKET}", check=False).returncode == 0
    # The socket still listens: the next gpuctl call starts gpud again (socket activation).
    host.sh("systemctl reset-failed gpud.service")
    assert host.gpuctl_json("status")["gpu_backend"] == "static"
    assert host.show("gpud.service", "ActiveState")["ActiveState"] == "active"


def test_watchdog_restarts_a_stopped_gpud(installed: Host) -> None:
    host = installed
    host.write("/etc/systemd/system/gpud.service.d/watchdog.conf", "[Service]\nWatchdogSec=2\nTimeoutAbortSec=5\n")
    host.sh("systemctl daemon-reload && systemctl reset-failed gpud.service && systemctl restart gpud.service")
    try:
        frozen = host.main_pid()
        restarts = int(host.show("gpud.service", "NRestarts")["NRestarts"])
        host.sh(f"kill -STOP {frozen}")
        wait_for(
            lambda: (p := host.main_pid()) not in (0, frozen) and host.show("gpud.service", "ActiveState")[
                "ActiveState"] == "active" and p,
            "systemd to restart gpud after its watchdog expired",
            timeout=60,
            interval=0.5,
        )  # fmt: skip
        assert int(host.show("gpud.service", "NRestarts")["NRestarts"]) == restarts + 1
        assert any("Watchdog timeout" in message(e) for e in host.gpud_entries())
    finally:
        host.sh("rm /etc/systemd/system/gpud.service.d/watchdog.conf && systemctl daemon-reload")
        host.sh("systemctl reset-failed gpud.service && systemctl restart gpud.service")


def test_config_error_does_not_loop(installed: Host) -> None:
    host = installed
    good = host.read("/etc/gpud/gpud.yaml")
    host.write("/etc/gpud/gpud.yaml", good + "bogus_key: 1\n")
    try:
        host.sh("systemctl reset-failed gpud.service")
        assert host.sh("systemctl restart gpud.service", check=False).returncode != 0
        failed = host.show("gpud.service", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        # Exit status 2 is not restarted (RestartPreventExitStatus=2).
        assert failed == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2", "NRestarts": "0"}
        errors = [e for e in host.journal("-u", "gpud.service", "-p", "err") if "config error" in message(e)]
        assert errors and errors[-1]["PRIORITY"] == "3"
        # A connection waiting on the socket starts gpud again and again (it is never accepted); the start limit
        # ends that loop: StartLimitBurst=5 starts, then the service and its socket give up.
        host.sh(f"python3 -c 'import socket; socket.socket(socket.AF_UNIX).connect(\"{SOCKET}\")'")
        wait_for(
            lambda: host.show("gpud.socket", "Result")["Result"] == "service-start-limit-hit",
            "the start limit to stop gpud's socket-activated restarts",
            timeout=90,
            interval=0.5,
        )
        starts = [e for e in host.journal("-u", "gpud.service", "-p", "err") if "bogus_key" in message(e)]
        assert len(starts) <= 6, len(starts)  # the restart above, then at most StartLimitBurst activations
        assert any("Start request repeated too quickly" in message(e) for e in host.gpud_entries())
        assert host.show("gpud.service", "ActiveState")["ActiveState"] == "failed"
    finally:
        host.write("/etc/gpud/gpud.yaml", good)
        host.sh("systemctl reset-failed gpud.service gpud.socket && systemctl start gpud.socket gpud.service")
    assert host.show("gpud.service", "ActiveState")["ActiveState"] == "active"


def test_upgrade_switches_release_and_keeps_config(installed: Host) -> None:
    host = installed
    host.write("/etc/gpud/gpud.env", host.read("/etc/gpud/gpud.env") + "GPUD_LOG_LEVEL=debug\n")
    old_release = host.sh("readlink -f /opt/gpud/current").stdout.strip()
    old_pid = host.main_pid()
    host.sh("/src/scripts/install.sh --wheelhouse /wheelhouse", timeout=300)
    new_release = host.sh("readlink -f /opt/gpud/current").stdout.strip()
    assert new_release != old_release
    assert host.sh(f"test -x {old_release}/bin/gpud", check=False).returncode == 0  # kept for a rollback
    assert host.main_pid() not in (0, old_pid)
    assert "GPUD_LOG_LEVEL=debug" in host.read("/etc/gpud/gpud.env")  # the operator's file is kept


def test_uninstall_purge_removes_everything(installed: Host) -> None:
    host = installed
    host.sh("/opt/gpud/uninstall.sh --purge")
    assert host.sh("systemctl cat gpud.service", check=False).returncode != 0
    gone = "/usr/local/bin/gpud /usr/local/bin/gpuctl /opt/gpud /etc/gpud /usr/local/lib/systemd/system/gpud.socket"
    assert host.sh(f"for p in {gone}; do test -e $p && echo $p; done; true").stdout.strip() == ""
    assert host.sh("getent group gpud", check=False).returncode != 0
    assert host.sh("pgrep -f 'gpud run'", check=False).returncode != 0


def preset_block(presets_yaml: str, preset: str) -> str:
    """The indented lines of one preset of demo-text in the shipped models.yaml."""
    lines = presets_yaml.splitlines(keepends=True)
    start = lines.index(f"    {preset}:\n") + 1
    block = []
    for line in lines[start:]:
        if not line.startswith("      "):
            break
        block.append(line)
    return "".join(block)


def flatten_presets(body: Any) -> list[dict[str, Any]]:
    """`gpuctl presets -o json` as a flat list of {model, preset, ...}, whatever its nesting."""
    if isinstance(body, dict):
        body = body.get("presets", body)
    if isinstance(body, list):
        return [p for p in body if isinstance(p, dict)]
    return [{"model": m, "preset": p} for m, presets in body.items() for p in presets]
