"""What the shipped deployment relies on from gpud itself: the static fallback of the shipped configuration,
check-config agreeing with `gpud run`, fatal errors at journal priority err, and the admin group taken from a
socket systemd passed."""

from __future__ import annotations

import grp
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpud.api.peercred import PeerCredentials, PeerPolicy
from gpud.daemon.listeners import passed_socket_group
from gpud.daemon.logs import journal_prefix
from gpud.errors import ConfigError
from gpud.gpu.inventory import open_inventory
from tests.nvml_standin import FakeNvml

REPO = Path(__file__).resolve().parents[2]


def test_auto_without_nvml_or_ids_declares_gpu_zero_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        inventory = open_inventory("auto", (), {}, nvml=FakeNvml(fail_init=True))
    assert inventory.backend == "static" and [g.index for g in inventory.gpus] == [0]
    assert "declaring static GPU(s) 0" in caplog.text


def test_auto_fallback_declares_the_tagged_gpus() -> None:
    inventory = open_inventory("auto", (), {0: "low", 1: "high"}, nvml=FakeNvml(fail_init=True))
    assert [(g.index, g.difficulty) for g in inventory.gpus] == [(0, "low"), (1, "high")]


def test_explicit_static_still_needs_ids() -> None:
    with pytest.raises(ConfigError, match="needs GPU_DEVICE_IDS"):
        open_inventory("static", (), {})


def check_config(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpud", "check-config", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=REPO,
        timeout=60,
    )


def test_check_config_resolves_gpus_as_run_does() -> None:
    presets = {"GPUD_PRESETS_FILE": str(REPO / "etc" / "gpud" / "models.yaml")}
    shipped = check_config("--config", str(REPO / "etc" / "gpud" / "gpud.yaml"), env=presets)
    assert shipped.returncode == 0, shipped.stderr
    assert "GPU(s) 0:low" in shipped.stdout  # no NVML on the test machines: the static fallback, named
    # `gpud run` refuses NVML-only without NVML (exit 2); check-config must refuse it as well.
    nvml_only = check_config(env={**presets, "GPUD_GPU_BACKEND": "nvml"})
    assert nvml_only.returncode == 2 and "NVML did not load" in nvml_only.stderr


def test_config_errors_reach_the_journal_at_priority_err() -> None:
    env = {"GPUD_PRESETS_FILE": str(REPO / "etc" / "gpud" / "models.yaml"), "JOURNAL_STREAM": "8:1234"}
    result = subprocess.run(
        [sys.executable, "-m", "gpud", "run", "--config", "/nonexistent/gpud.yaml"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("<3>gpud: config error: ") for line in lines), lines


def test_journal_prefix_only_under_journald() -> None:
    assert journal_prefix(3, {"JOURNAL_STREAM": "8:1"}) == "<3>"
    assert journal_prefix(3, {}) == ""


def test_the_group_of_a_passed_socket_is_admitted(tmp_path: Path) -> None:
    gid = os.getgroups()[0] if os.getgroups() else os.getgid()
    path = tmp_path / "gpud.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
        assert passed_socket_group(sock) == gid
        os.chmod(path, 0o600)  # the group may not connect: nobody but the owner is admitted
        assert passed_socket_group(sock) is None
    policy = PeerPolicy(gid=gid)
    assert policy.gid == gid
    assert policy.admits(PeerCredentials(pid=1, uid=12345, gid=gid))
    assert not PeerPolicy(gid=None).admits(PeerCredentials(pid=1, uid=12345, gid=gid))


def test_a_named_group_wins_over_the_passed_socket() -> None:
    name = grp.getgrgid(os.getgid()).gr_name
    assert PeerPolicy(name, gid=None).gid == os.getgid()
