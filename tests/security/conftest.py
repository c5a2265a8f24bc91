"""Attack tests: each reproduces a finding of the security review against a real daemon and checks that it is now
refused, bounded or recovered. Figures the attacks measure (RSS, file descriptors, /health latency, ...) are
recorded with the `figures` fixture and printed as one table at the end of the run (docs/security.md sums them up).
"""

from __future__ import annotations

import pytest

from tests.figures import FigureTable

SECURITY_FIGURES = FigureTable("security figures", scenario_width=34)
figures = SECURITY_FIGURES.fixture()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print every recorded figure, grouped by attack."""
    SECURITY_FIGURES.print(terminalreporter, config)
