"""GPU health: the NVML reader's XID events, ECC counts and throttle reasons against the stand-in pynvml, the
auto-drain policy on a real inventory and scheduler, and the per-GPU metrics."""

from __future__ import annotations

import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpud.daemon.gpu_metrics import GpuCollector
from gpud.errors import Unavailable
from gpud.gpu.health import FATAL_XIDS, GpuHealth
from gpud.gpu.inventory import GpuInventory, open_inventory
from gpud.gpu.nvml import THROTTLE_REASONS, NvmlReader
from gpud.gpu.scheduler import Scheduler
from gpud.metrics import Metrics
from tests.nvml_standin import NVML_ERROR_NOT_SUPPORTED, FakeNvml, NVMLError


def open_fake(fake: FakeNvml, difficulty: dict[int, str] | None = None) -> tuple[GpuInventory, Scheduler, GpuHealth]:
    inventory = open_inventory("nvml", (), difficulty or {}, nvml=fake)
    scheduler = Scheduler(inventory)
    return inventory, scheduler, GpuHealth(inventory, scheduler)


# ---- the reader ---------------------------------------------------------------------------------------------------


def test_reader_sees_xids_injected_after_registration_only() -> None:
    fake = FakeNvml(count=2)
    reader = NvmlReader(fake)
    reader.open()
    assert fake.inject_xid(0, 13) == 0  # nobody registered yet: NVML delivers it to no one
    assert reader.watch_xids(0) is None and reader.watch_xids(1) is None
    assert reader.xids(0) == []  # nothing pending: the 0 ms wait times out, nothing raised
    fake.inject_xid(0, 79)
    fake.inject_xid(0, 31)
    fake.inject_xid(1, 48)
    assert reader.xids(0) == [79, 31]  # oldest first, each set its own GPU's
    assert reader.xids(1) == [48]
    assert reader.xids(0) == []  # taken once
    reader.close()
    assert all(s.freed for s in fake.event_sets) and fake.shutdowns == 1


def test_reader_never_waits_for_events() -> None:
    """The poll runs once per refresh in an executor thread: it must not block for the NVML wait timeout."""
    fake = FakeNvml(count=1)
    reader = NvmlReader(fake)
    reader.open()
    reader.watch_xids(0)
    waits: list[int] = []
    real_wait = fake.nvmlEventSetWait_v2
    fake.nvmlEventSetWait_v2 = lambda s, ms: waits.append(ms) or real_wait(s, ms)  # type: ignore[method-assign]
    reader.xids(0)
    assert waits == [0]


def test_xid_registration_not_supported_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml(count=2)
    fake.no_events.add(1)
    with caplog.at_level(logging.WARNING):
        inventory = open_inventory("nvml", (), {}, nvml=fake)
    assert "GPU 1 (GPU-0000-1): XID events are not available (Not Supported)" in caplog.text
    assert [g.index for g in inventory.gpus] == [0, 1] and inventory.sample(1).error is None  # type: ignore[union-attr]
    assert len(fake.event_sets) == 2 and fake.event_sets[1].freed  # the unregistered set was given back


def test_ecc_counts_and_not_supported_tolerated() -> None:
    fake = FakeNvml(count=2)
    fake.no_ecc.add(1)  # a GPU without ECC answers Not Supported, like a consumer board
    fake.set_ecc(0, corrected=7, uncorrected=2)
    with pytest.raises(NVMLError) as info:
        fake.nvmlDeviceGetTotalEccErrors(1, 0, 0)
    assert info.value.value == NVML_ERROR_NOT_SUPPORTED and str(info.value) == "Not Supported"
    inventory = open_inventory("nvml", (), {}, nvml=fake)
    first, second = inventory.sample(0), inventory.sample(1)
    assert first is not None and (first.ecc_corrected, first.ecc_uncorrected) == (7, 2) and first.error is None
    assert second is not None and (second.ecc_corrected, second.ecc_uncorrected) == (None, None)
    assert second.error is None and second.memory_used_bytes == 2 * 1024**3  # the rest of the sample is read


@pytest.mark.parametrize("legacy", [False, True], ids=["clocks-event-reasons", "throttle-reasons"])
def test_throttle_bits_map_to_reasons(legacy: bool) -> None:
    fake = FakeNvml(count=2)
    fake.legacy_driver = legacy  # an older driver: the newer call answers Function Not Found
    idle, display = fake.nvmlClocksEventReasonGpuIdle, fake.nvmlClocksEventReasonDisplayClockSetting
    fake.throttle[0] = fake.nvmlClocksEventReasonHwThermalSlowdown | fake.nvmlClocksEventReasonSwPowerCap | idle
    fake.throttle[1] = display  # not a slowdown gpud reports
    inventory = open_inventory("nvml", (), {}, nvml=fake)
    assert inventory.sample(0).throttle_reasons == ("sw_power_cap", "hw_thermal")  # type: ignore[union-attr]
    assert inventory.sample(1).throttle_reasons == ()  # type: ignore[union-attr]
    every = sum(getattr(fake, f"nvmlClocksEventReason{n}") for n in ("SwPowerCap", "HwSlowdown", "SyncBoost"))
    every |= fake.nvmlClocksEventReasonSwThermalSlowdown | fake.nvmlClocksEventReasonHwPowerBrakeSlowdown
    fake.throttle[0] = every | fake.nvmlClocksEventReasonHwThermalSlowdown
    inventory.refresh()
    assert inventory.sample(0).throttle_reasons == tuple(THROTTLE_REASONS)  # type: ignore[union-attr]


# ---- the policy ---------------------------------------------------------------------------------------------------


def test_fatal_xid_drains_with_reason_until_undrain(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml(count=2)
    inventory, scheduler, health = open_fake(fake, {0: "low", 1: "low"})
    fake.inject_xid(0, 79)
    inventory.refresh()
    with caplog.at_level(logging.WARNING):
        health.check()
    assert not scheduler.is_healthy(0) and scheduler.is_drained(0) and scheduler.drain_reason(0) == "xid 79"
    assert "GPU 0 (GPU-0000-0) is unhealthy (xid 79)" in caplog.text
    assert health.auto_drains == {"xid": 1, "ecc": 0} and inventory.xid_count(0) == 1
    assert scheduler.acquire("low", "t1", "task").gpu.index == 1  # never GPU 0
    with pytest.raises(Unavailable):
        scheduler.acquire("low", "t9", "task")
    scheduler.undrain(0)
    assert scheduler.is_healthy(0) and scheduler.drain_reason(0) is None
    health.check()  # nothing new: stays in service
    assert scheduler.acquire("low", "t2", "task").gpu.index == 0
    fake.inject_xid(0, 48)  # a new fatal XID after the undrain drains again
    inventory.refresh()
    health.check()
    assert scheduler.drain_reason(0) == "xid 48" and health.auto_drains["xid"] == 2


def test_application_xids_are_counted_but_drain_nothing() -> None:
    fake = FakeNvml(count=1)
    inventory, scheduler, health = open_fake(fake)
    for xid in (13, 31, 43, 45, 92):
        assert xid not in FATAL_XIDS
        fake.inject_xid(0, xid)
    inventory.refresh()
    health.check()
    assert scheduler.is_healthy(0) and not scheduler.is_drained(0) and inventory.xid_count(0) == 5
    assert inventory.last_xid(0) == 92 and health.auto_drains == {"xid": 0, "ecc": 0}


def test_uncorrectable_ecc_drains_and_only_a_rise_drains_again() -> None:
    fake = FakeNvml(count=2)
    fake.no_ecc.add(1)
    inventory, scheduler, health = open_fake(fake)
    fake.set_ecc(0, corrected=100)  # corrected errors alone are no reason
    inventory.refresh()
    health.check()
    assert scheduler.is_healthy(0)
    fake.set_ecc(0, uncorrected=2)
    inventory.refresh()
    health.check()
    assert scheduler.drain_reason(0) == "ecc uncorrectable 2" and health.auto_drains["ecc"] == 1
    fake.set_ecc(0, uncorrected=3)  # rises while drained: absorbed, not a second drain
    inventory.refresh()
    health.check()
    assert health.auto_drains["ecc"] == 1 and scheduler.drain_reason(0) == "ecc uncorrectable 2"
    scheduler.undrain(0)
    inventory.refresh()
    health.check()  # volatile counts stay until a GPU reset: the same 3 does not drain again
    assert scheduler.is_healthy(0) and not scheduler.is_drained(0)
    fake.set_ecc(0, uncorrected=4)
    inventory.refresh()
    health.check()
    assert scheduler.drain_reason(0) == "ecc uncorrectable 4" and health.auto_drains["ecc"] == 2
    assert scheduler.is_healthy(1)  # no ECC on GPU 1: never a reason


def test_ecc_errors_present_at_start_drain_before_any_lease() -> None:
    fake = FakeNvml(count=1)
    fake.set_ecc(0, uncorrected=1)
    _inventory, scheduler, health = open_fake(fake)
    health.check()  # create_services runs this once on the sample taken when NVML opened
    with pytest.raises(Unavailable):
        scheduler.acquire("low", "t", "task")


def test_operator_drain_keeps_its_reason_and_a_fault_overrides_it() -> None:
    fake = FakeNvml(count=1)
    inventory, scheduler, health = open_fake(fake)
    scheduler.drain(0)
    assert scheduler.drain_reason(0) == "operator" and scheduler.is_healthy(0)
    fake.inject_xid(0, 95)
    inventory.refresh()
    health.check()
    assert scheduler.drain_reason(0) == "xid 95" and not scheduler.is_healthy(0)
    scheduler.drain(0)  # draining again does not hide the fault
    assert scheduler.drain_reason(0) == "xid 95"


def test_running_lease_is_not_touched_by_an_auto_drain() -> None:
    fake = FakeNvml(count=1)
    inventory, scheduler, health = open_fake(fake)
    lease = scheduler.acquire("low", "running", "session")
    fake.inject_xid(0, 79)
    inventory.refresh()
    health.check()
    assert scheduler.lease_of(0) is lease and scheduler.drain_reason(0) == "xid 79"


# ---- the metrics --------------------------------------------------------------------------------------------------


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The exposition parsed back: (name, labels) -> value."""
    text = metrics.render().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def gpu(index: int, difficulty: str, **extra: str) -> frozenset[tuple[str, str]]:
    """The labels of one GPU's series (the stand-in's uuids)."""
    return frozenset({"gpu": str(index), "uuid": f"GPU-0000-{index}", "difficulty": difficulty, **extra}.items())


def test_gpu_collector_exports_health_errors_and_throttling() -> None:
    fake = FakeNvml(count=2)
    fake.no_ecc.add(1)
    fake.throttle[0] = fake.nvmlClocksEventReasonHwSlowdown
    inventory, scheduler, health = open_fake(fake, {0: "high"})
    metrics = Metrics()
    metrics.watch(GpuCollector(inventory, scheduler, health))
    seen = samples(metrics)
    first, second = gpu(0, "high"), gpu(1, "low")
    assert seen[("gpud_gpu_utilization_ratio", first)] == 0.4
    assert seen[("gpud_gpu_memory_used_bytes", first)] == 1024**3
    assert seen[("gpud_gpu_memory_total_bytes", first)] == 80 * 1024**3
    assert seen[("gpud_gpu_temperature_celsius", first)] == 55
    assert seen[("gpud_gpu_power_watts", first)] == 250 and ("gpud_gpu_power_watts", second) not in seen
    assert seen[("gpud_gpu_healthy", first)] == 1 and seen[("gpud_gpu_xid_errors_total", first)] == 0
    assert seen[("gpud_gpu_ecc_errors", gpu(0, "high", type="uncorrected"))] == 0
    assert seen[("gpud_gpu_ecc_errors", gpu(0, "high", type="corrected"))] == 0
    assert not any(name == "gpud_gpu_ecc_errors" and ("gpu", "1") in labels for name, labels in seen)  # no ECC
    for reason in THROTTLE_REASONS:
        assert seen[("gpud_gpu_throttled", gpu(0, "high", reason=reason))] == (reason == "hw_slowdown")
        assert seen[("gpud_gpu_throttled", gpu(1, "low", reason=reason))] == 0
    for kind in ("xid", "ecc"):
        assert seen[("gpud_gpu_auto_drains_total", frozenset({("reason", kind)}))] == 0
    assert not any(name in ("gpud_gpu_utilization_percent",) or name.endswith("_created") for name, _ in seen)

    fake.inject_xid(0, 79)
    fake.set_ecc(0, uncorrected=2)
    inventory.refresh()
    health.check()
    seen = samples(metrics)
    assert seen[("gpud_gpu_healthy", first)] == 0 and seen[("gpud_gpu_drained", first)] == 1
    assert seen[("gpud_gpu_healthy", second)] == 1
    assert seen[("gpud_gpu_xid_errors_total", first)] == 1
    assert seen[("gpud_gpu_ecc_errors", gpu(0, "high", type="uncorrected"))] == 2
    # One drain: the ECC rise came in the same check, when the GPU was already drained for the XID.
    assert seen[("gpud_gpu_auto_drains_total", frozenset({("reason", "xid")}))] == 1
    assert seen[("gpud_gpu_auto_drains_total", frozenset({("reason", "ecc")}))] == 0


def test_static_gpus_export_health_and_xids_but_no_nvml_readings() -> None:
    inventory = open_inventory("static", (0,), {0: "low"})
    scheduler = Scheduler(inventory)
    metrics = Metrics()
    metrics.watch(GpuCollector(inventory, scheduler, GpuHealth(inventory, scheduler)))
    seen = samples(metrics)
    labels = frozenset({"gpu": "0", "uuid": "GPU-static-0", "difficulty": "low"}.items())
    assert seen[("gpud_gpu_healthy", labels)] == 1 and seen[("gpud_gpu_xid_errors_total", labels)] == 0
    assert not any(name in ("gpud_gpu_throttled", "gpud_gpu_power_watts") for name, _ in seen)
