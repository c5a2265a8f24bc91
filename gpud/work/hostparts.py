"""The parts of the host that restoring after a restart works with, as one object: the restorer, the one-off
reattacher and the session adopter each need all of them (gpud/work/restore.py, reattach.py, sessions/adopt.py)."""

from __future__ import annotations

from dataclasses import dataclass

from gpud.gpu.inventory import GpuInventory
from gpud.gpu.scheduler import Scheduler
from gpud.modelstore import ModelStore
from gpud.settings import LiveConfig
from gpud.work.uids import WorkerIds


@dataclass(frozen=True)
class HostParts:
    """Settings, the GPUs and their leases, the model cache and the worker uids."""

    config: LiveConfig
    inventory: GpuInventory
    scheduler: Scheduler
    store: ModelStore
    ids: WorkerIds
