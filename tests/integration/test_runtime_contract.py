"""The runtime contract, run unchanged against podman, docker and process (real engines, real processes).

Where a runtime cannot enforce something it says so in `capabilities` and the test skips with that reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import textwrap
from collections.abc import Callable

import pytest

from gpud.runtime.base import (
    Capability,
    ContainerNotFound,
    ContainerRuntime,
    ContainerSpec,
    ContainerState,
    ExitStatus,
    ImageUnavailable,
    LogLine,
    Stream,
)
from gpud.settings.images import ImageNotAllowed, ImagePolicy
from tests.integration.conftest import TEST_WORKER_UID

MakeSpec = Callable[..., ContainerSpec]
TEST_RUN_LABEL = "gpud.test_run"  # set on every test container by conftest's make_spec


async def run_allowed(runtime: ContainerRuntime, policy: ImagePolicy, spec: ContainerSpec) -> str:
    """What gpud does before a worker exists: check the allowlist, make the image present, then run."""
    policy.check(spec.image)
    await runtime.ensure_image(spec.image)
    return await runtime.run(spec)


def require(runtime: ContainerRuntime, capability: Capability) -> None:
    """Skip, naming the reason, when the runtime does not enforce this capability."""
    if capability not in runtime.capabilities:
        pytest.skip(f"the {runtime.name} runtime does not enforce {capability.value}")


async def run_to_end(rt: ContainerRuntime, spec: ContainerSpec) -> tuple[ExitStatus, list[str], list[str]]:
    """Run, follow the logs to the end, wait; return (exit status, stdout lines, stderr lines)."""
    container_id = await rt.run(spec)
    lines = [line async for line in rt.logs(container_id)]
    status = await rt.wait(container_id)
    return status, split(lines, Stream.STDOUT), split(lines, Stream.STDERR)


def split(lines: list[LogLine], stream: Stream) -> list[str]:
    """The lines of one stream, in order."""
    return [line.line for line in lines if line.stream is stream]


def python(code: str) -> tuple[str, ...]:
    """A command running this Python code."""
    return ("python3", "-c", textwrap.dedent(code))


async def test_stdout_and_stderr_separate_and_in_order(runtime: ContainerRuntime, make_spec: MakeSpec) -> None:
    code = """
        import sys
        for i in range(200):
            print(f"out {i}", flush=True)
            print(f"err {i}", file=sys.stderr, flush=True)
        sys.stdout.write("no newline at the end")
    """
    status, out, err = await run_to_end(runtime, make_spec(*python(code)))
    assert status.exit_code == 0
    assert out == [f"out {i}" for i in range(200)] + ["no newline at the end"]
    assert err == [f"err {i}" for i in range(200)]


@pytest.mark.parametrize("code", [0, 3, 42])
async def test_exit_codes(runtime: ContainerRuntime, make_spec: MakeSpec, code: int) -> None:
    container_id = await runtime.run(make_spec("sh", "-c", f"exit {code}"))
    status = await runtime.wait(container_id)
    assert status == ExitStatus(exit_code=code, oom_killed=False, error=status.error)
    info = await runtime.inspect(container_id)
    assert info.state is ContainerState.EXITED
    assert info.exit_code == code


async def wait_for_line(rt: ContainerRuntime, container_id: str, wanted: str) -> None:
    """Follow the logs until `wanted` appears (the worker has installed its signal handling)."""
    async for line in rt.logs(container_id):
        if line.line == wanted:
            return
    raise AssertionError(f"container ended without printing {wanted!r}")


async def test_stop_sends_sigterm_first(runtime: ContainerRuntime, make_spec: MakeSpec) -> None:
    script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
    container_id = await runtime.run(make_spec("sh", "-c", script))
    await asyncio.wait_for(wait_for_line(runtime, container_id, "ready"), 60)
    await runtime.stop(container_id, grace_seconds=30)
    status = await runtime.wait(container_id)
    assert status.exit_code == 7  # its own TERM handler ran: the grace period was honoured
    assert "got-term" in [line.line async for line in runtime.logs(container_id, follow=False)]


async def test_stop_kills_a_worker_that_ignores_sigterm(runtime: ContainerRuntime, make_spec: MakeSpec) -> None:
    script = "trap '' TERM; echo ready; while :; do sleep 0.1; done"
    container_id = await runtime.run(make_spec("sh", "-c", script))
    await asyncio.wait_for(wait_for_line(runtime, container_id, "ready"), 60)
    await runtime.stop(container_id, grace_seconds=1)
    status = await runtime.wait(container_id)
    assert status.exit_code == 137  # 128 + SIGKILL after the grace period
    assert (await runtime.inspect(container_id)).state is ContainerState.EXITED


async def test_memory_limit_is_enforced_and_reported_as_oom(runtime: ContainerRuntime, make_spec: MakeSpec) -> None:
    require(runtime, Capability.MEMORY_LIMIT)
    code = """
        chunks = []
        for i in range(64):  # 64 x 16 MiB = 1 GiB, far past the 128 MiB limit
            chunks.append(bytearray(16 * 1024 * 1024))
            print(f"allocated {16 * (i + 1)} MiB", flush=True)
        print("survived")
    """
    status, out, _ = await run_to_end(runtime, make_spec(*python(code)))
    assert status.exit_code == 137
    assert "survived" not in out
    assert out, "the worker should have allocated something before the limit"
    if Capability.OOM_REPORT not in runtime.capabilities:
        pytest.skip(f"limit enforced (killed, 137), but {runtime.name} here does not report the kill as OOM")
    assert status.oom_killed


async def test_pids_limit_stops_a_fork_bomb(runtime: ContainerRuntime, make_spec: MakeSpec) -> None:
    require(runtime, Capability.PIDS_LIMIT)
    code = """
        import os, time
        children = 0
        try:
            for _ in range(500):  # bounded even if the limit were missing
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
            print(f"unbounded {children}")
        except OSError as exc:
            print(f"blocked {children} errno={exc.errno}")
    """
    status, out, _ = await run_to_end(runtime, make_spec(*python(code)))
    assert status.exit_code == 0
    assert out and out[-1].startswith("blocked "), out
    assert int(out[-1].split()[1]) < 64  # TEST_LIMITS.pids


async def test_no_network_host_loopback_unreachable(runtime: ContainerRuntime, make_spec: MakeSpec) -> None:
    require(runtime, Capability.NETWORK_NONE)
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    code = f"""
        import socket
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", {port}))
            print("connected")
        except OSError as exc:
            print(f"failed errno={{exc.errno}}")
    """
    try:
        status, out, _ = await run_to_end(runtime, make_spec(*python(code)))
    finally:
        server.close()
        await server.wait_closed()
    assert status.exit_code == 0
    assert out and out[0].startswith("failed"), out
    assert accepted == []


async def test_root_filesystem_read_only_tmp_writable(runtime: ContainerRuntime, make_spec: MakeSpec) -> None:
    require(runtime, Capability.READ_ONLY_ROOTFS)
    script = "touch /etc/gpud-probe && echo etc-writable || echo etc-read-only; touch /tmp/x && echo tmp-ok"
    status, out, _ = await run_to_end(runtime, make_spec("sh", "-c", script))
    assert out == ["etc-read-only", "tmp-ok"]


async def test_model_dir_reachable_through_model_path(runtime: ContainerRuntime, make_spec: MakeSpec) -> None:
    status, out, _ = await run_to_end(runtime, make_spec("sh", "-c", 'cat "$MODEL_PATH/weights.txt"'))
    assert status.exit_code == 0
    assert out == ["weights-v1"]


async def test_models_read_only(runtime: ContainerRuntime, make_spec: MakeSpec) -> None:
    require(runtime, Capability.READ_ONLY_MODELS)
    script = 'echo x > "$MODEL_PATH/weights.txt" && echo models-writable || echo models-read-only'
    status, out, _ = await run_to_end(runtime, make_spec("sh", "-c", script))
    assert out == ["models-read-only"]


async def test_runs_as_unprivileged_user(runtime: ContainerRuntime, make_spec: MakeSpec) -> None:
    require(runtime, Capability.NON_ROOT_USER)
    status, out, _ = await run_to_end(runtime, make_spec("sh", "-c", "id -u; id -g"))
    assert out == [str(TEST_WORKER_UID), str(TEST_WORKER_UID)]


async def test_environment_contract(runtime: ContainerRuntime, make_spec: MakeSpec) -> None:
    spec = make_spec("sh", "-c", "for v in $NAMES; do eval echo $v=\\$$v; done")
    names = "NVIDIA_VISIBLE_DEVICES CUDA_VISIBLE_DEVICES GPUD_GPU_ID GPUD_TASK_ID GPUD_MODEL_ID GPUD_PRESET"
    spec = dataclasses.replace(spec, env={**spec.env, "NAMES": names})
    _, out, _ = await run_to_end(runtime, spec)
    assert out == [
        "NVIDIA_VISIBLE_DEVICES=GPU-static-0",
        "CUDA_VISIBLE_DEVICES=GPU-static-0",
        "GPUD_GPU_ID=0",
        f"GPUD_TASK_ID={spec.labels['gpud.task_id']}",
        "GPUD_MODEL_ID=test-model",
        "GPUD_PRESET=contract",
    ]


async def test_labels_set_and_list_by_label_finds_it(
    runtime: ContainerRuntime, make_spec: MakeSpec, run_id: str, worker_image: str
) -> None:
    spec = make_spec("sleep", "30")
    container_id = await runtime.run(spec)
    found = await runtime.list({"gpud.managed": "true", "gpud.task_id": spec.labels["gpud.task_id"]})
    assert [c.id for c in found] == [container_id]
    info = found[0]
    for key in ("gpud.managed", "gpud.task_id", "gpud.session_id", "gpud.gpu_uuid", "gpud.model", "gpud.preset"):
        assert info.labels[key] == spec.labels[key]
    assert info.state is ContainerState.RUNNING
    assert info.created > 0
    assert worker_image.split(":")[0] in info.image
    inspected = await runtime.inspect(container_id)
    assert (inspected.id, inspected.labels[TEST_RUN_LABEL]) == (container_id, run_id)
    await runtime.remove(container_id)
    assert await runtime.list({"gpud.task_id": spec.labels["gpud.task_id"]}) == []
    with pytest.raises(ContainerNotFound):
        await runtime.inspect(container_id)
    await runtime.remove(container_id)  # removing twice is fine


async def test_disallowed_image_creates_no_container(
    runtime: ContainerRuntime, make_spec: MakeSpec, run_id: str, worker_image: str
) -> None:
    before = await runtime.list({TEST_RUN_LABEL: run_id})
    policy = ImagePolicy.parse("registry.example/allowed-*, other:1.0")
    with pytest.raises(ImageNotAllowed) as raised:
        await run_allowed(runtime, policy, make_spec("true"))
    assert raised.value.code == "image_not_allowed"
    assert worker_image in raised.value.message
    assert await runtime.list({TEST_RUN_LABEL: run_id}) == before
    # The same spec under a policy that allows it does run: the rejection above was the policy's doing.
    container_id = await run_allowed(runtime, ImagePolicy.parse("gpud-worker-*"), make_spec("true"))
    assert [c.id for c in await runtime.list({TEST_RUN_LABEL: run_id})] == [container_id]


async def test_missing_image_fails_naming_it_and_the_build_script(runtime: ContainerRuntime) -> None:
    require(runtime, Capability.IMAGES)
    # Qualified with a loopback registry: the failed pull never leaves this machine (a short name could send
    # docker to docker.io).
    image = "127.0.0.1:9/gpud-no-such-image:latest"
    results = await asyncio.gather(*(runtime.ensure_image(image) for _ in range(3)), return_exceptions=True)
    for result in results:
        assert isinstance(result, ImageUnavailable), result
        assert result.code == "image_unavailable"
        assert image in result.message
        assert "scripts/build-images.sh" in result.message
