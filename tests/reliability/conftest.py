"""Reliability tests: gpud against an engine that goes away, output that must arrive whole, and load at full
capacity, each on real daemons and engines. What they measure is recorded with the `figures` fixture and printed
as one table at the end of the run (the README's "Reliability" section sums it up)."""

from __future__ import annotations

import pytest

from tests.figures import FigureTable

RELIABILITY_FIGURES = FigureTable("reliability figures", scenario_width=40)
figures = RELIABILITY_FIGURES.fixture()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print every recorded figure, grouped by test."""
    RELIABILITY_FIGURES.print(terminalreporter, config)
