"""`bench/run --quick` on the process runtime: every benchmark runs end to end against real daemons with tiny sizes
and the report lists every row of the performance table with its goal. The numbers are not asserted: benchmarks
stay out of the suite's pass/fail (a quick run on a shared machine measures little)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import DETAILS, ROWS, previous_changes

REPO = Path(__file__).resolve().parents[2]
# Rows whose benchmarks need nothing but Python and gpud (model fetch needs curl, gpuctl compares with podman).
SELF_CONTAINED = ("oneoff", "session_rtt", "streaming", "first_event", "cold_start", "fanin_p99", "fanin_rss")


@pytest.mark.timeout(110)
def test_quick_run_reports_every_row(tmp_path: Path) -> None:
    """The quick run exits 0 (every benchmark gave its result; curl and podman are there) and the report has each
    row, measured."""
    out = tmp_path / "performance.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run"), "--quick", "--runtime", "process", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=REPO,
        check=False,
    )
    needs = {"model_fetch": "curl", "gpuctl_ls": "podman"}
    if all(shutil.which(tool) for tool in needs.values()):
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = out.read_text()
    lines = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| ")}
    for row in ROWS + DETAILS:
        assert row.what in lines, f"row {row.key!r} missing from the report"
        assert row.what in proc.stdout, f"row {row.key!r} missing from the printed table"
    for row in ROWS:
        assert f"| {row.goal} |" in lines[row.what], f"row {row.key!r} does not show its goal"
    measured = [*SELF_CONTAINED, *(key for key, tool in needs.items() if shutil.which(tool))]
    for row in ROWS:
        if row.key in measured:
            cell = lines[row.what].split(" | ")[1]
            assert cell[:1].isdigit(), f"row {row.key!r} was not measured: {lines[row.what]}"
    for row in DETAILS:
        if row.key.startswith("container_"):
            assert "skipped" in lines[row.what]  # the process runtime: no engine benchmark
    assert "Machine: " in report and "kernel" in report
    assert "## What was changed and why" in report
    assert previous_changes(report) is None  # the placeholder, for the lead to fill


def test_the_lead_s_changes_survive_a_rerun() -> None:
    """A filled "What was changed and why" section is kept when bench/run writes the report again."""
    from bench.report import markdown

    filled = markdown({}, {}, {"cores": "2"}, "bench/run", "- removed the health round trip on submit (-4 ms)")
    assert previous_changes(filled) == "- removed the health round trip on submit (-4 ms)"
    again = markdown({}, {}, {"cores": "2"}, "bench/run", previous_changes(filled))
    assert "removed the health round trip" in again
