"""The image allowlist and the single-flight image fetch (coordination logic; engines are tested in integration)."""

from __future__ import annotations

import asyncio

import pytest

from gpud.errors import ErrorKind
from gpud.runtime.base import ImageUnavailable, ProgressCallback
from gpud.runtime.images import ImageEnsurer
from gpud.settings.images import ImageNotAllowed, ImagePolicy, normalize_reference
from tests.waiting import wait_until

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


@pytest.mark.parametrize(
    ("allowlist", "image", "allowed"),
    [
        ("gpud-worker-*", "gpud-worker-python:latest", True),
        ("gpud-worker-*", "gpud-worker-python", True),
        ("gpud-worker-*", "evil/gpud-worker-python", False),
        ("llm-runner:latest", "llm-runner", True),  # no tag means :latest
        ("llm-runner:latest", "llm-runner:v2", False),
        ("registry.local/team/*", "registry.local/team/a:1", True),
        ("registry.local/team/*", "registry.local/other/a:1", False),
        ("a:1, b:*", "b:7", True),
        ("", "anything", False),
        (f"llm@{DIGEST}", f"llm@{DIGEST}", True),
        (f"llm@{DIGEST}", f"llm@{OTHER}", False),
        (f"llm@{DIGEST}", "llm:latest", False),  # pinned: a tag alone is not enough
        ("llm:*", f"llm@{DIGEST}", True),
    ],
)
def test_policy(allowlist: str, image: str, allowed: bool) -> None:
    assert ImagePolicy.parse(allowlist).allows(image) is allowed


def test_check_raises_forbidden_naming_image_and_list() -> None:
    with pytest.raises(ImageNotAllowed) as raised:
        ImagePolicy.parse("gpud-worker-*").check("evil:latest")
    assert raised.value.code == "image_not_allowed"
    assert raised.value.kind is ErrorKind.FORBIDDEN
    assert "evil:latest" in raised.value.message and "gpud-worker-*" in raised.value.message


def test_bad_digest_pin_rejected() -> None:
    with pytest.raises(ValueError, match="sha256"):
        ImagePolicy.parse("llm@sha256:short")


def test_normalize_reference() -> None:
    assert normalize_reference("a") == "a:latest"
    assert normalize_reference("host:5000/a") == "host:5000/a:latest"
    assert normalize_reference("a:1") == "a:1"


class Registry:
    """Records present/pull calls; the pull waits on a gate so concurrent callers overlap."""

    def __init__(self, fail: bool = False) -> None:
        self.present_images: set[str] = set()
        self.pulls: list[str] = []
        self.gate = asyncio.Event()
        self.fail = fail

    async def present(self, image: str) -> bool:
        return image in self.present_images

    async def pull(self, image: str, progress: ProgressCallback) -> None:
        self.pulls.append(image)
        await progress("downloading")
        await self.gate.wait()
        if self.fail:
            raise ImageUnavailable.for_image(image, "podman", "no registry")
        self.present_images.add(image)


async def test_concurrent_callers_share_one_pull_and_see_progress() -> None:
    reg = Registry()
    ensurer = ImageEnsurer(reg.present, reg.pull)
    seen: list[list[str]] = [[], [], []]
    tasks = [asyncio.create_task(ensurer.ensure("img", seen[i].append)) for i in range(3)]
    await wait_until(lambda: reg.pulls, "the pull to start", timeout=5)
    # All three callers hang on that one pull: the progress it reported reached each of them.
    await wait_until(lambda: seen == [["downloading"]] * 3, "every caller to see the pull's progress", timeout=5)
    assert ensurer.in_flight() == {"img"} and not any(task.done() for task in tasks)
    reg.gate.set()
    await asyncio.gather(*tasks)
    assert reg.pulls == ["img"]
    assert seen[0] == ["downloading"]
    assert ensurer.in_flight() == set()
    await ensurer.ensure("img")  # present now: no second pull
    assert reg.pulls == ["img"]


async def test_failed_pull_fails_every_waiter_and_next_call_retries() -> None:
    reg = Registry(fail=True)
    ensurer = ImageEnsurer(reg.present, reg.pull)
    reg.gate.set()
    results = await asyncio.gather(*(ensurer.ensure("img") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, ImageUnavailable) for r in results)
    assert reg.pulls == ["img"]
    with pytest.raises(ImageUnavailable, match=r"scripts/build-images\.sh"):
        await ensurer.ensure("img")
    assert reg.pulls == ["img", "img"]


async def test_cancelled_waiter_does_not_cancel_shared_pull() -> None:
    reg = Registry()
    ensurer = ImageEnsurer(reg.present, reg.pull)
    first = asyncio.create_task(ensurer.ensure("img"))
    second = asyncio.create_task(ensurer.ensure("img"))
    await wait_until(lambda: reg.pulls, "the shared pull to start", timeout=5)
    first.cancel()
    reg.gate.set()
    await second
    assert first.cancelled() and reg.pulls == ["img"] and "img" in reg.present_images


async def test_an_image_found_present_is_not_looked_up_again_until_forgotten() -> None:
    reg = Registry()
    reg.present_images.add("img")
    looked: list[str] = []

    async def present(image: str) -> bool:
        looked.append(image)
        return await reg.present(image)

    ensurer = ImageEnsurer(present, reg.pull)
    for _ in range(3):
        await ensurer.ensure("img")
    assert looked == ["img"], "one lookup, then remembered"
    assert not ensurer.forget("other")  # never seen: nothing to forget
    reg.present_images.discard("img")  # removed from the engine: the runtime's create says so, and forgets it
    assert ensurer.forget("img")
    reg.gate.set()
    await ensurer.ensure("img")  # looked up again, found missing, pulled
    assert looked == ["img", "img"] and reg.pulls == ["img"]
    await ensurer.ensure("img")
    assert looked == ["img", "img"], "pulled: known present"
