"""Shared fixtures: config files in temp dirs, and a real `gpud run` process with a real notify socket."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.daemonproc import DaemonProcess
from tests.fileservice import FileService

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def presets_file(tmp_path: Path) -> Path:
    """A presets file in the original design's form."""
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        "  llama-7b:\n"
        "    inference:\n"
        '      docker_image: "llm-runner:latest"\n'
        '      command: ["python", "inference.py"]\n'
        "      env_vars:\n"
        '        MODEL_NAME: "llama-7b"\n'
    )
    return path


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[type[DaemonProcess]]:
    """Start real gpud processes; every one still running at the end is stopped."""
    started: list[DaemonProcess] = []

    class Factory(DaemonProcess):
        def __init__(self, **kwargs: object) -> None:
            super().__init__(tmp_path, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Factory
    for proc in started:
        proc.kill()


@pytest.fixture
async def svc() -> AsyncIterator[FileService]:
    """The test file service (tests/fileservice.py) listening on loopback."""
    service = FileService()
    await service.start()
    yield service
    await service.stop()
