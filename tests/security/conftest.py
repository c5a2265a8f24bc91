"""Attack tests: each reproduces a finding of the security review against a real daemon and checks that it is now
refused, bounded or recovered. Figures the attacks measure (RSS, file descriptors, /health latency, ...) are
recorded with the `figures` fixture and printed as one table at the end of the run (docs/security.md sums them up).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

FIGURES_KEY = pytest.StashKey[list["Figure"]]()


@dataclass(frozen=True)
class Figure:
    """One measured number of one attack."""

    attack: str
    name: str
    value: float
    unit: str


@dataclass
class Figures:
    """Records the numbers an attack test measured."""

    sink: list[Figure] = field(default_factory=list)

    def record(self, attack: str, name: str, value: float, unit: str = "") -> float:
        """Keep one figure for the summary; returns the value so it can be asserted on too."""
        self.sink.append(Figure(attack, name, float(value), unit))
        return value


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """Where a test records what it measured."""
    return Figures(request.config.stash.setdefault(FIGURES_KEY, []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print every recorded figure, grouped by attack."""
    recorded = config.stash.get(FIGURES_KEY, [])
    if not recorded:
        return
    terminalreporter.section("security figures")
    for figure in recorded:
        terminalreporter.write_line(f"{figure.attack:<34} {figure.name:<44} {figure.value:>12.3f} {figure.unit}")
