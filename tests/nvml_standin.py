"""A stand-in for the pynvml module: the one fake this project allows (CI machines have no NVIDIA GPU).

It implements the pynvml calls gpud makes with nvidia-ml-py's names, signatures, constants and error codes (an
NVMLError carries the code in `value`, as pynvml's does), and lets a test change what the "hardware" reports:
`inject_xid`, `set_ecc`, `throttle`, `broken`, `no_ecc`, `no_events`. The same gpud code runs against the real
pynvml in tests/gpu/test_nvml_real.py on a lent GPU machine. tests/nvml_shim/pynvml.py puts one in a gpud child
process.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

# nvml.h's return codes (the ones the stand-in raises), with pynvml's texts for them.
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
_TEXT = {
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
}
UNSET_INSTANCE = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId of an event outside MIG


class NVMLError(Exception):
    """Like pynvml.NVMLError: `value` is NVML's return code, str() its text."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _TEXT.get(self.value, f"NVML Error with code {self.value}")


class _EventSet:
    """What nvmlEventSetCreate returns: the devices registered on it and the events waiting to be read."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}  # handle -> event type mask
        self.pending: list[SimpleNamespace] = []
        self.freed = False


class FakeNvml:
    """Implements the pynvml calls gpud makes, for N GPUs (handles are the GPU indexes)."""

    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_TIMEOUT = NVML_ERROR_TIMEOUT
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_TEMPERATURE_GPU = 0
    NVML_VOLATILE_ECC = 0
    NVML_AGGREGATE_ECC = 1
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    nvmlEventTypeNone = 0x0
    nvmlEventTypeSingleBitEccError = 0x1
    nvmlEventTypeDoubleBitEccError = 0x2
    nvmlEventTypePState = 0x4
    nvmlEventTypeXidCriticalError = 0x8
    nvmlClocksEventReasonGpuIdle = 0x1
    nvmlClocksEventReasonApplicationsClocksSetting = 0x2
    nvmlClocksEventReasonSwPowerCap = 0x4
    nvmlClocksEventReasonHwSlowdown = 0x8
    nvmlClocksEventReasonSyncBoost = 0x10
    nvmlClocksEventReasonSwThermalSlowdown = 0x20
    nvmlClocksEventReasonHwThermalSlowdown = 0x40
    nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80
    nvmlClocksEventReasonDisplayClockSetting = 0x100
    nvmlClocksThrottleReasonGpuIdle = 0x1
    nvmlClocksThrottleReasonSwPowerCap = 0x4
    nvmlClocksThrottleReasonHwSlowdown = 0x8
    nvmlClocksThrottleReasonSyncBoost = 0x10
    nvmlClocksThrottleReasonSwThermalSlowdown = 0x20
    nvmlClocksThrottleReasonHwThermalSlowdown = 0x40
    nvmlClocksThrottleReasonHwPowerBrakeSlowdown = 0x80

    def __init__(self, count: int = 2, fail_init: bool = False) -> None:
        self.count = count
        self.fail_init = fail_init
        self.broken: set[int] = set()  # GPUs that answer "GPU is lost"
        self.no_ecc: set[int] = set()  # GPUs without ECC (or with it off): Not Supported
        self.no_events: set[int] = set()  # GPUs whose event registration answers Not Supported
        self.legacy_driver = False  # a driver without nvmlDeviceGetCurrentClocksEventReasons (Function Not Found)
        self.throttle: dict[int, int] = {}  # GPU -> clock event reason bits
        self.ecc: dict[tuple[int, int], int] = {}  # (GPU, error type) -> volatile count
        self.event_sets: list[_EventSet] = []
        self.shutdowns = 0
        self.memory_reads = 0  # one per GPU per sample: shows how often gpud samples
        self._events = threading.Condition()

    # ---- what a test changes ----------------------------------------------------------------------------------

    def inject_xid(self, index: int, xid: int) -> int:
        """The driver reports XID `xid` on GPU `index`: queued on every live event set that registered the GPU
        for critical XID errors (none registered: nobody hears it, as with NVML). Returns how many sets got it."""
        event = SimpleNamespace(
            device=index,
            eventType=self.nvmlEventTypeXidCriticalError,
            eventData=xid,
            gpuInstanceId=UNSET_INSTANCE,
            computeInstanceId=UNSET_INSTANCE,
        )
        delivered = 0
        with self._events:
            for event_set in self.event_sets:
                if not event_set.freed and event_set.registered.get(index, 0) & self.nvmlEventTypeXidCriticalError:
                    event_set.pending.append(event)
                    delivered += 1
            self._events.notify_all()
        return delivered

    def set_ecc(self, index: int, corrected: int | None = None, uncorrected: int | None = None) -> None:
        """Set GPU `index`'s volatile ECC error counts."""
        if corrected is not None:
            self.ecc[(index, self.NVML_MEMORY_ERROR_TYPE_CORRECTED)] = corrected
        if uncorrected is not None:
            self.ecc[(index, self.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)] = uncorrected

    # ---- pynvml ---------------------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index in self.broken:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if not 0 <= index < self.count:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetIndex(self, handle: int) -> int:
        return handle

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-0000-{handle}".encode()  # older pynvml returns bytes

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> Any:
        self.memory_reads += 1
        return SimpleNamespace(total=80 * 1024**3, used=(handle + 1) * 1024**3, free=0)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=40 + handle, memory=10)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 55

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if handle == 1:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return 250_000  # milliwatts

    def nvmlDeviceGetTotalEccErrors(self, handle: int, errorType: int, counterType: int) -> int:
        if handle in self.no_ecc:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if errorType not in (self.NVML_MEMORY_ERROR_TYPE_CORRECTED, self.NVML_MEMORY_ERROR_TYPE_UNCORRECTED):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if counterType not in (self.NVML_VOLATILE_ECC, self.NVML_AGGREGATE_ECC):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self.ecc.get((handle, errorType), 0)  # aggregate = volatile here: the stand-in never resets

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        if self.legacy_driver:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        return self.throttle.get(handle, 0)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: int) -> int:
        return self.throttle.get(handle, 0)

    def nvmlEventSetCreate(self) -> _EventSet:
        event_set = _EventSet()
        with self._events:
            self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(self, handle: int, eventTypes: int, eventSet: _EventSet) -> None:
        if handle in self.no_events:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if eventSet.freed:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        with self._events:
            eventSet.registered[handle] = eventSet.registered.get(handle, 0) | eventTypes

    def nvmlEventSetWait_v2(self, eventSet: _EventSet, timeoutms: int) -> Any:
        """The oldest pending event, waiting up to `timeoutms`; NVMLError(Timeout) when none came."""
        with self._events:
            if eventSet.freed:
                raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            self._events.wait_for(lambda: bool(eventSet.pending), timeout=timeoutms / 1000)
            if not eventSet.pending:
                raise NVMLError(NVML_ERROR_TIMEOUT)
            return eventSet.pending.pop(0)

    def nvmlEventSetWait(self, eventSet: _EventSet, timeoutms: int) -> Any:
        return self.nvmlEventSetWait_v2(eventSet, timeoutms)

    def nvmlEventSetFree(self, eventSet: _EventSet) -> None:
        with self._events:
            eventSet.freed = True
