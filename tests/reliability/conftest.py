"""Reliability tests: gpud against an engine that goes away, output that must arrive whole, and load at full
capacity, each on real daemons and engines. What they measure is recorded with the `figures` fixture and printed
as one table at the end of the run (the README's "Reliability" section sums it up)."""

from __future__ import annotations

import pytest

from tests.security.conftest import Figure, Figures

FIGURES_KEY = pytest.StashKey[list[Figure]]()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """Where a test records what it measured."""
    return Figures(request.config.stash.setdefault(FIGURES_KEY, []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print every recorded figure, grouped by test."""
    recorded = config.stash.get(FIGURES_KEY, [])
    if not recorded:
        return
    terminalreporter.section("reliability figures")
    for figure in recorded:
        terminalreporter.write_line(f"{figure.attack:<40} {figure.name:<44} {figure.value:>12.3f} {figure.unit}")
