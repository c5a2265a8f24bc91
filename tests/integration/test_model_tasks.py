"""Tasks whose model is not cached yet: fetched once from the file service, however many tasks ask at once."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fileservice import FileService
from tests.integration.stack import Stack, parse_sse, runtimes, stack_fixture

GPUS = 16


async def fetching_stack(runtime: str, service: FileService, tmp_path: Path, gpus: int = 2) -> AsyncIterator[Stack]:
    env = {
        "AUTO_FETCH_MODELS": "true",
        "FILE_SERVICE_URL": service.url,
        "FILE_SERVICE_INTERNAL_KEY": service.key or "",
        "GPU_DEVICE_IDS": ",".join(str(i) for i in range(gpus)),
        "GPU_DEVICE_DIFFICULTY": ",".join(f"{i}:low" for i in range(gpus)),
    }
    async for stack in stack_fixture(runtime, env):
        # The stack places the model by hand; take it away so tasks must fetch it.
        model_dir = stack.base / "models" / stack.model_id
        tree = tmp_path / "tree"
        shutil.copytree(model_dir, tree)
        shutil.rmtree(model_dir)
        service.add_tree(stack.model_id, tree, tmp_path / "model.tar.gz", gzip=True)
        yield stack


async def test_sixteen_concurrent_tasks_fetch_the_model_once(svc: FileService, tmp_path: Path) -> None:
    async for stack in fetching_stack("process", svc, tmp_path, gpus=GPUS):
        # Slow the download so every task arrives while it is in flight.
        svc.set(stack.model_id, chunk_delay=0.05, chunk_size=64)
        streams = await asyncio.gather(
            *(stack.run(stack.body("oneoff", metadata={"prompt": f"task {i}"})) for i in range(GPUS))
        )
        assert svc.requests[stack.model_id] == 1
        for events in streams:
            assert events[-1].data["status"] == "completed", events[-1].data
            fetching = [e.data for e in events if e.event == "worker" and e.data["status"] == "fetching_model"]
            assert fetching and fetching[-1]["phase"] == "done", "every waiting task sees the fetch progress"
        assert (stack.base / "models" / stack.model_id / "tokens.txt").is_file()


async def test_failed_fetch_fails_the_task_and_the_next_task_tries_again(svc: FileService, tmp_path: Path) -> None:
    async for stack in fetching_stack("process", svc, tmp_path):
        svc.set(stack.model_id, status=500)
        events = await stack.run(stack.body("oneoff"))
        finish = events[-1].data
        assert finish["status"] == "failed" and finish["error"]["code"] == "model_fetch_failed"
        assert "500" in finish["error"]["message"]
        assert not (stack.base / "models" / stack.model_id).exists()
        assert stack.services.scheduler.leases() == []
        session = await stack.run(stack.body("session"))
        assert session[-1].data["status"] == "failed" and session[-1].data["error"]["code"] == "model_fetch_failed"
        assert stack.services.scheduler.leases() == []
        svc.set(stack.model_id, status=None)
        again = await stack.run(stack.body("oneoff"))
        assert again[-1].data["status"] == "completed"


@pytest.mark.parametrize("runtime", [r for r in runtimes() if r != "process"])
async def test_fetched_model_is_mounted_read_only_into_a_session_worker(
    runtime: str, svc: FileService, tmp_path: Path
) -> None:
    async for stack in fetching_stack(runtime, svc, tmp_path):
        events = await stack.run(stack.body("session", metadata={"max_tokens": 3, "delay": 0.01}))
        assert events[-1].data["status"] == "completed", events[-1].data
        assert any(e.data.get("status") == "fetching_model" for e in events if e.event == "worker")
        text = next(e for e in events if e.event == "text").data["text"]
        assert text.split()[0] == "alpha", "the worker read the fetched tokens.txt"
        assert svc.requests[stack.model_id] == 1


async def test_oneoff_leases_its_gpu_only_after_the_fetch(svc: FileService, tmp_path: Path) -> None:
    async for stack in fetching_stack("process", svc, tmp_path, gpus=1):
        scheduler = stack.services.scheduler
        # No GPU free: the fast 503 stays, though the model is not cached and nothing is leased to check.
        holder = scheduler.acquire("low", "someone-else", "task")
        async with await stack.submit(stack.body("oneoff")) as refused:
            assert refused.status == 503 and (await refused.json())["error"]["code"] == "no_gpu_available"
        assert svc.requests[stack.model_id] == 0
        scheduler.release(holder)
        # A free GPU at submit, taken during the fetch: the task fails in its stream; the model stays cached.
        svc.set(stack.model_id, chunk_delay=0.05, chunk_size=16)
        async with await stack.submit(stack.body("oneoff")) as response:
            assert response.status == 200
            await response.content.readuntil(b"downloading")
            assert scheduler.leases() == [], "no GPU is held while the model is fetched"
            holder = scheduler.acquire("low", "someone-else", "task")
            events = parse_sse((await response.read()).decode())
        finish = events[-1].data
        assert finish["status"] == "failed" and finish["error"]["code"] == "no_gpu_available", finish
        assert "now that the model is fetched" in finish["error"]["message"]
        assert not [e for e in events if e.data.get("status") == "gpu_allocated"]
        assert (stack.base / "models" / stack.model_id / "tokens.txt").is_file()
        scheduler.release(holder)
        assert scheduler.leases() == []
        # Cached now: leased at submit, gpu_allocated first, as before.
        again = await stack.run(stack.body("oneoff"))
        assert again[0].data["status"] == "gpu_allocated" and again[-1].data["status"] == "completed"
        assert svc.requests[stack.model_id] == 1 and scheduler.leases() == []
