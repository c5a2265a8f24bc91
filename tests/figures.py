"""Numbers a test measured, printed as one table at the end of the run (security and reliability tests use it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest


@dataclass(frozen=True)
class Figure:
    """One measured number of one scenario (an attack, a failure, a load)."""

    attack: str
    name: str
    value: float
    unit: str


@dataclass
class Figures:
    """Records the numbers a test measured."""

    sink: list[Figure] = field(default_factory=list)

    def record(self, attack: str, name: str, value: float, unit: str = "") -> float:
        """Keep one figure for the summary; returns the value so it can be asserted on too."""
        self.sink.append(Figure(attack, name, float(value), unit))
        return value


class FigureTable:
    """One titled table: a `figures` fixture for a conftest, and the summary its terminal hook prints."""

    def __init__(self, title: str, scenario_width: int) -> None:
        self.title = title
        self.scenario_width = scenario_width
        self.key = pytest.StashKey[list[Figure]]()

    def fixture(self) -> Callable[[pytest.FixtureRequest], Figures]:
        """The `figures` fixture: where a test records what it measured."""
        key = self.key

        @pytest.fixture
        def figures(request: pytest.FixtureRequest) -> Figures:
            return Figures(request.config.stash.setdefault(key, []))

        return figures

    def print(self, terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
        """Print every recorded figure, in the order recorded (grouped by test)."""
        recorded = config.stash.get(self.key, [])
        if not recorded:
            return
        terminalreporter.section(self.title)
        for figure in recorded:
            terminalreporter.write_line(
                f"{figure.attack:<{self.scenario_width}} {figure.name:<44} {figure.value:>12.3f} {figure.unit}"
            )
