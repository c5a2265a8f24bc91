"""Reading GPUs through a pynvml-compatible module (nvidia-ml-py's `pynvml`, or tests/nvml_standin.py's FakeNvml).

Every call here blocks in the driver, so gpud makes them from an executor thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

# NVML's error codes (nvml.h); fixed by its ABI, so usable without the module's constants.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_EVENT_TYPE_XID_CRITICAL_ERROR = 0x8  # nvmlEventTypeXidCriticalError

# The clock event (throttle) reasons gpud reports, and their bits in nvmlDeviceGetCurrentClocksEventReasons (the same
# bits as the older nvmlDeviceGetCurrentClocksThrottleReasons). Idle, application and display clock settings are
# not slowdowns and are left out; the set is fixed so every reason is exported, 0 included.
THROTTLE_REASONS: dict[str, int] = {
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
}

# How many XID events one poll takes from a GPU's event set at most (the rest wait for the next poll).
MAX_EVENTS_PER_POLL = 64


@dataclass(frozen=True)
class GpuSample:
    """One reading of a GPU's counters (None where the backend cannot tell: unsupported or static)."""

    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    utilization_percent: int | None = None
    temperature_c: int | None = None
    power_watts: float | None = None
    ecc_corrected: int | None = None  # volatile counts: since the driver loaded or the GPU was last reset
    ecc_uncorrected: int | None = None
    throttle_reasons: tuple[str, ...] | None = None  # active reasons from THROTTLE_REASONS; () when none
    sampled_at: float = 0.0
    error: str | None = None


class NvmlReader:
    """Reads identities, samples and XID events through a pynvml-compatible module."""

    def __init__(self, nvml: ModuleType | Any) -> None:
        self._nvml = nvml
        self._event_sets: dict[int, Any] = {}  # GPU index -> its own event set (so no handle to index mapping)

    def open(self) -> int:
        """Initialise NVML and return the device count; raises whatever NVML raises."""
        self._nvml.nvmlInit()
        return int(self._nvml.nvmlDeviceGetCount())

    def close(self) -> None:
        """Free the event sets and shut NVML down (errors are logged, not raised: this runs at shutdown)."""
        for event_set in self._event_sets.values():
            with contextlib.suppress(Exception):  # NVML's own errors; the shutdown below frees them anyway
                self._nvml.nvmlEventSetFree(event_set)
        self._event_sets.clear()
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:  # NVML's own error classes; nothing to do at shutdown
            logger.debug("nvmlShutdown failed: %s", exc)

    def identity(self, index: int) -> tuple[str, str]:
        """(uuid, name) of the GPU at index."""
        handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        return _text(self._nvml.nvmlDeviceGetUUID(handle)), _text(self._nvml.nvmlDeviceGetName(handle))

    def watch_xids(self, index: int) -> str | None:
        """Register for the GPU's critical XID events; None when watched, else why not (e.g. "Not Supported")."""
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            event_set = nvml.nvmlEventSetCreate()
        except Exception as exc:  # NVMLError subclasses
            return _why(exc)
        try:
            kind = getattr(nvml, "nvmlEventTypeXidCriticalError", NVML_EVENT_TYPE_XID_CRITICAL_ERROR)
            nvml.nvmlDeviceRegisterEvents(handle, kind, event_set)
        except Exception as exc:  # NotSupported on some boards and in some VMs
            with contextlib.suppress(Exception):
                nvml.nvmlEventSetFree(event_set)
            return _why(exc)
        self._event_sets[index] = event_set
        return None

    def xids(self, index: int) -> list[int]:
        """The XIDs reported on the GPU since the last call, oldest first; never blocks (waits 0 ms)."""
        event_set = self._event_sets.get(index)
        if event_set is None:
            return []
        nvml = self._nvml
        found: list[int] = []
        for _ in range(MAX_EVENTS_PER_POLL):
            try:
                data = nvml.nvmlEventSetWait_v2(event_set, 0)
            except Exception as exc:  # NVMLError_Timeout: nothing pending; anything else: try again next poll
                if _code(exc) != NVML_ERROR_TIMEOUT:
                    logger.debug("GPU %d: reading XID events failed: %s", index, _why(exc))
                break
            if int(data.eventType) & NVML_EVENT_TYPE_XID_CRITICAL_ERROR:
                found.append(int(data.eventData))
        return found

    def sample(self, index: int) -> GpuSample:
        """Memory, utilisation, temperature, power, volatile ECC counts and throttle reasons of the GPU at index."""
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
            temperature = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        except Exception as exc:  # NVMLError subclasses: a lost GPU, a driver problem
            return GpuSample(sampled_at=time.time(), error=_why(exc))
        # Optional counters: boards without a power sensor or without ECC (most consumer GPUs) answer Not Supported.
        power = _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        corrected = self._ecc(handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED)
        uncorrected = self._ecc(handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
        return GpuSample(
            memory_total_bytes=int(memory.total),
            memory_used_bytes=int(memory.used),
            utilization_percent=int(utilization.gpu),
            temperature_c=int(temperature),
            power_watts=power,
            ecc_corrected=corrected,
            ecc_uncorrected=uncorrected,
            throttle_reasons=self._throttle_reasons(handle),
            sampled_at=time.time(),
        )

    def _ecc(self, handle: Any, error_type: int) -> int | None:
        """Volatile ECC errors of one type; None where the GPU has no ECC or it is off (Not Supported)."""
        nvml = self._nvml
        return _optional(lambda: int(nvml.nvmlDeviceGetTotalEccErrors(handle, error_type, nvml.NVML_VOLATILE_ECC)))

    def _throttle_reasons(self, handle: Any) -> tuple[str, ...] | None:
        """Active reasons, from the newer call where the driver has it, else the older (deprecated) one."""
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            read = getattr(self._nvml, name, None)
            if read is None:
                continue
            try:
                bits = int(read(handle))
            except Exception as exc:  # FunctionNotFound: a driver older than the bindings; try the older call
                if _code(exc) == NVML_ERROR_FUNCTION_NOT_FOUND:
                    continue
                return None
            return tuple(reason for reason, bit in THROTTLE_REASONS.items() if bits & bit)
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _code(exc: BaseException) -> int | None:
    """NVML's error code of an NVMLError (its `value`), None for other exceptions."""
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _optional(read: Any) -> Any:
    """Some counters are unsupported on some boards; treat those as unknown."""
    try:
        return read()
    except Exception:
        return None
