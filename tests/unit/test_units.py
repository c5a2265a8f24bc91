"""The systemd units parse and reference what gpud reads (systemd-analyze verify on the real files)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "units"


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this environment's gpud (verify checks the binary exists)."""
    gpud = Path(sys.executable).with_name("gpud")
    if not gpud.exists():
        pytest.skip("the gpud console script is not installed in this environment")
    (tmp_path / "gpud.service").write_text((UNITS / "gpud.service").read_text().replace("/usr/bin/gpud", str(gpud)))
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
    service = (UNITS / "gpud.service").read_text()
    assert "Type=notify" in service and "WatchdogSec=" in service and "ExecReload=/bin/kill -HUP $MAINPID" in service
