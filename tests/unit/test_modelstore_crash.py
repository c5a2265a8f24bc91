"""SIGKILL in the middle of a download (the store in a real child process) leaves no partial model."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpud.modelstore import ModelStore
from tests.fileservice import FileService

MiB = 1 << 20
CHILD = """
import asyncio, sys
from pathlib import Path
from gpud.modelstore import ModelStore

async def main() -> None:
    store = ModelStore(Path(sys.argv[1]), file_service_url=sys.argv[2], internal_key=sys.argv[3], auto_fetch=True)
    await store.start()
    await store.ensure("big", lambda p: print(p.phase.value, p.bytes_done, flush=True))
    print("DONE", flush=True)

asyncio.run(main())
"""


@pytest.fixture
async def svc() -> AsyncIterator[FileService]:
    service = FileService()
    service.add_zeros("big", 64 * MiB)
    service.set("big", chunk_delay=0.02)  # 256 KiB per 20 ms: about 5 s in all
    await service.start()
    yield service
    await service.stop()


async def test_sigkill_mid_download_leaves_no_partial_model(tmp_path: Path, svc: FileService) -> None:
    cache = tmp_path / "cache"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(cache), svc.url, str(svc.key), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        while True:
            line = (await asyncio.wait_for(child.stdout.readline(), 30)).decode().split()
            assert line and line[0] != "DONE", "the download finished before it could be killed"
            if line[0] == "downloading" and int(line[1]) >= 8 * MiB:
                break
        temps = [p for p in cache.iterdir() if p.name.startswith(".tmp-big-")]
        assert len(temps) == 1 and (temps[0] / "payload").stat().st_size > 0
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (cache / "big").exists(), "a killed download must never look like a model"
    assert os.listdir(cache) == [temps[0].name]  # only the temporary is left...

    svc.set("big", chunk_delay=0.0)
    store = ModelStore(cache, file_service_url=svc.url, internal_key=svc.key, auto_fetch=True)
    await store.start()  # ...and the next start removes it
    try:
        assert os.listdir(cache) == []
        path = await store.ensure("big")
        assert (path / "zeros.bin").stat().st_size == 64 * MiB
        assert (await store.verify("big")).ok is True
    finally:
        await store.close()
    assert svc.requests["big"] == 2
