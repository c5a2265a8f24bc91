"""GPU inventory: static declaration, and the NVML path against a stand-in pynvml module.

The stand-in is the one fake this project allows (there is no NVIDIA GPU on CI machines); the same code runs against
the real pynvml in tests/gpu/test_nvml_real.py on a lent GPU machine.
"""

from __future__ import annotations

import logging

import pytest

from gpud.errors import ConfigError, Unavailable
from gpud.gpu.inventory import open_inventory
from gpud.gpu.scheduler import Scheduler
from tests.nvml_standin import FakeNvml


def test_static_inventory_from_device_ids() -> None:
    inventory = open_inventory("static", (0, 1), {0: "low", 1: "high"})
    assert [(g.index, g.difficulty, g.real) for g in inventory.gpus] == [(0, "low", False), (1, "high", False)]
    assert inventory.backend == "static" and inventory.sample(0) is None


def test_nvml_inventory_reads_identity_and_samples() -> None:
    fake = FakeNvml(count=2)
    inventory = open_inventory("nvml", (), {1: "high"}, nvml=fake)
    assert inventory.backend == "nvml"
    assert [(g.index, g.uuid, g.difficulty, g.real) for g in inventory.gpus] == [
        (0, "GPU-0000-0", "low", True),
        (1, "GPU-0000-1", "high", True),
    ]
    sample = inventory.sample(0)
    assert sample is not None and sample.memory_used_bytes == 1024**3 and sample.utilization_percent == 40
    assert sample.power_watts == 250.0
    assert inventory.sample(1).power_watts is None  # type: ignore[union-attr]  # unsupported counter is unknown
    inventory.close()
    assert fake.shutdowns == 1


def test_nvml_device_ids_select_gpus_and_must_exist() -> None:
    inventory = open_inventory("nvml", (1,), {1: "high"}, nvml=FakeNvml(count=2))
    assert [g.index for g in inventory.gpus] == [1]
    with pytest.raises(ConfigError, match=r"GPU\(s\) \[3\] do not exist"):
        open_inventory("nvml", (0, 3), {}, nvml=FakeNvml(count=2))
    with pytest.raises(ConfigError, match="gpu_device_difficulty"):
        open_inventory("nvml", (), {5: "high"}, nvml=FakeNvml(count=2))


def test_auto_falls_back_to_static_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        inventory = open_inventory("auto", (0,), {}, nvml=FakeNvml(fail_init=True))
    assert inventory.backend == "static"
    assert "falling back to the static GPU backend" in caplog.text


def test_nvml_backend_fails_loudly_when_nvml_does_not_load() -> None:
    with pytest.raises(ConfigError, match="NVML did not load"):
        open_inventory("nvml", (), {}, nvml=FakeNvml(fail_init=True))


def test_lost_gpu_is_unhealthy_and_not_leased() -> None:
    fake = FakeNvml(count=2)
    inventory = open_inventory("nvml", (), {0: "low", 1: "low"}, nvml=fake)
    fake.broken.add(0)
    inventory.refresh()
    assert inventory.unhealthy() == {0: "GPU is lost"}
    lease = Scheduler(inventory).acquire("low", "t1", "task")
    assert lease.gpu.index == 1


def test_difficulty_routing_drain_and_release() -> None:
    inventory = open_inventory("static", (0, 1, 2), {0: "low", 1: "high", 2: "low"})
    scheduler = Scheduler(inventory)
    first = scheduler.acquire("low", "a", "task")
    second = scheduler.acquire("low", "b", "session")
    assert (first.gpu.index, second.gpu.index) == (0, 2)
    with pytest.raises(Unavailable) as info:
        scheduler.acquire("low", "c", "task")
    assert info.value.code == "no_gpu_available" and info.value.retry_after
    scheduler.release(first)
    scheduler.release(first)  # twice is harmless
    scheduler.drain(0)
    with pytest.raises(Unavailable):
        scheduler.acquire("low", "c", "task")
    scheduler.undrain(0)
    assert scheduler.acquire("low", "c", "task").gpu.index == 0
    assert scheduler.acquire("high", "d", "task").gpu.index == 1


def test_no_gpu_with_that_difficulty() -> None:
    scheduler = Scheduler(open_inventory("static", (0,), {0: "low"}))
    with pytest.raises(Unavailable) as info:
        scheduler.acquire("high", "x", "task")
    assert info.value.code == "no_gpu_for_difficulty"


def test_nvml_samples_reach_the_metrics() -> None:
    from gpud.daemon.gpu_metrics import GpuCollector
    from gpud.gpu.health import GpuHealth
    from gpud.metrics import Metrics

    inventory = open_inventory("nvml", (), {0: "high"}, nvml=FakeNvml(count=1))
    metrics = Metrics()
    scheduler = Scheduler(inventory)
    metrics.watch(GpuCollector(inventory, scheduler, GpuHealth(inventory, scheduler)))
    text = metrics.render().decode()
    labels = '{difficulty="high",gpu="0",uuid="GPU-0000-0"}'
    assert f"gpud_gpu_utilization_ratio{labels} 0.4" in text
    assert f"gpud_gpu_memory_used_bytes{labels} 1.073741824e+09" in text
    assert f"gpud_gpu_temperature_celsius{labels} 55.0" in text
