"""GPU health policy: a GPU that reports a fatal XID or uncorrectable ECC errors is auto-drained until undrained.

Fatal XIDs: those NVIDIA's Xid catalogue (Ampere and later) answers with a GPU reset, a reboot or a hardware check,
as commonly acted on by cluster health checks:

- 48 double-bit (uncorrectable) ECC error; 63 / 64 row remapping (or page retirement) recorded / failed;
- 74 NVLink error; 79 GPU has fallen off the bus;
- 94 / 95 contained / uncontained ECC error; 119 / 120 GSP (GPU System Processor) timeout / error;
- 154 the driver asks for a recovery action (GPU reset, reboot, drain).

Application faults (13, 31, 43, 45, ...) and 92 (a high corrected-error rate: a trend, in gpud_gpu_ecc_errors) are
counted but drain nothing. Only new leases are refused: a lease already running on the GPU is not stopped.
"""

from __future__ import annotations

import logging

from gpud.gpu.inventory import Gpu, GpuInventory
from gpud.gpu.scheduler import Scheduler

logger = logging.getLogger(__name__)

FATAL_XIDS = frozenset({48, 63, 64, 74, 79, 94, 95, 119, 120, 154})
AUTO_DRAIN_KINDS = ("xid", "ecc")


class GpuHealth:
    """Applies the policy after each refresh (on the event loop) and counts the auto-drains by kind."""

    def __init__(self, inventory: GpuInventory, scheduler: Scheduler) -> None:
        self._inventory = inventory
        self._scheduler = scheduler
        self.auto_drains: dict[str, int] = dict.fromkeys(AUTO_DRAIN_KINDS, 0)
        # Uncorrectable counts already acted on: volatile counts stay up until a GPU reset, so only a rise drains
        # again after an undrain. Errors present when gpud starts drain the GPU (the baseline starts at 0).
        self._ecc_seen: dict[int, int] = {}

    def check(self) -> None:
        """Drain the GPUs that reported a fatal XID or new uncorrectable ECC errors since the last check."""
        for index, xid in self._inventory.take_xids():
            gpu = self._inventory.get(index)
            if gpu is None:
                continue
            if xid in FATAL_XIDS:
                self._unhealthy(gpu, "xid", f"xid {xid}")
            else:
                logger.info("GPU %d (%s) reported XID %d (not fatal: the GPU stays in service)", index, gpu.uuid, xid)
        for gpu in self._inventory.gpus:
            sample = self._inventory.sample(gpu.index)
            count = sample.ecc_uncorrected if sample is not None else None
            if count and count > self._ecc_seen.get(gpu.index, 0):
                self._ecc_seen[gpu.index] = count
                self._unhealthy(gpu, "ecc", f"ecc uncorrectable {count}")

    def _unhealthy(self, gpu: Gpu, kind: str, reason: str) -> None:
        if not self._scheduler.is_healthy(gpu.index):
            logger.info("GPU %d (%s) is already drained as unhealthy; also: %s", gpu.index, gpu.uuid, reason)
            return
        self._scheduler.mark_unhealthy(gpu.index, reason)
        self.auto_drains[kind] += 1
        logger.warning(
            "GPU %d (%s) is unhealthy (%s): drained, it takes no new leases until an operator undrains it "
            "(gpuctl gpu undrain %d); work already on it is not stopped",
            gpu.index,
            gpu.uuid,
            reason,
            gpu.index,
        )
