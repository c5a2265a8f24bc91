"""The systemd units parse and reference what gpud reads (systemd-analyze verify on the real files)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "units"
# Where scripts/install.sh puts the virtual environment's scripts.
INSTALLED_BIN = "/opt/gpud/current/bin"
# The most `systemd-analyze security` may score the shipped service (docs/deploy.md lists what stays exposed).
MAX_EXPOSURE = 2.0


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this environment's gpud (verify checks the binary exists)."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "gpud").exists():
        pytest.skip("the gpud console script is not installed in this environment")
    service = (UNITS / "gpud.service").read_text().replace(f"{INSTALLED_BIN}/", f"{bin_dir}/")
    (tmp_path / "gpud.service").write_text(service)
    shutil.copy(UNITS / "gpud.socket", tmp_path / "gpud.socket")
    return tmp_path


def test_units_verify(unit_dir: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_dir / "gpud.service"), str(unit_dir / "gpud.socket")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "gpud" not in result.stderr, result.stderr  # no warnings about our units either


def test_socket_names_the_descriptor_gpud_looks_for() -> None:
    socket_unit = (UNITS / "gpud.socket").read_text()
    assert "FileDescriptorName=admin" in socket_unit and "SocketMode=0660" in socket_unit
    assert "SocketGroup=gpud" in socket_unit
    # Stopping gpud must not take its socket down (the socket file would dangle).
    assert "PartOf=" not in socket_unit.replace("Not PartOf=", "")


def test_service_runs_the_installed_gpud_and_does_not_loop_on_config_errors() -> None:
    from gpud.__main__ import EXIT_CONFIG

    service = (UNITS / "gpud.service").read_text()
    assert "Type=notify" in service and "WatchdogSec=" in service
    assert f"ExecStart={INSTALLED_BIN}/gpud run" in service
    # gpuctl waits for gpud's answer: the reload fails when gpud refuses the configuration.
    assert f"ExecReload={INSTALLED_BIN}/gpuctl reload" in service
    assert f"RestartPreventExitStatus={EXIT_CONFIG}" in service
    assert "StartLimitBurst=" in service and "LimitNOFILE=65536" in service


def test_security_exposure_is_at_most_two(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    shutil.copy(UNITS / "gpud.service", tmp_path / "gpud.service")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(tmp_path / "gpud.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    last = result.stdout.strip().splitlines()[-1]
    exposure = float(last.split("gpud.service:")[1].split()[0])
    print(f"systemd-analyze security gpud.service: {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout


def test_sysusers_and_tmpfiles_are_conf_files_that_apply(tmp_path: Path) -> None:
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed")
    assert sorted(p.relative_to(UNITS).as_posix() for p in UNITS.rglob("*.conf")) == [
        "sysusers.d/gpud.conf",
        "tmpfiles.d/gpud.conf",
    ]
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "sysusers.d" / "gpud.conf")], check=True, timeout=60
    )
    assert any(line.startswith("gpud:") for line in (tmp_path / "etc" / "group").read_text().splitlines())
    subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(UNITS / "tmpfiles.d" / "gpud.conf")],
        check=True,
        timeout=60,
    )
    assert oct((tmp_path / "var" / "lib" / "gpud").stat().st_mode & 0o777) == "0o711"
