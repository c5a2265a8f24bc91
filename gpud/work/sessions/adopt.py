"""Adopting a session whose worker container survived gpud's restart: same id, GPU, model, preset, uid, timers
and counters; its worker reconnects to its socket made again in place and says ready without loading anything.

Two steps, so that GPUs are leased in a fixed order before anything waits: prepare() (no await) takes the
preset, the GPU lease, the worker's uid and the model hold, or says why it cannot; reattach() waits for the
worker's reconnect and hands the session to the manager, or stops the container and records the session as
failed (`worker_lost`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpud.errors import Conflict, NotFound
from gpud.gpu.inventory import Gpu, GpuInventory
from gpud.runtime.base import LABEL_GPU, LABEL_MODEL, LABEL_PRESET, LABEL_SESSION, LABEL_TASK, LABEL_UID, ContainerInfo
from gpud.settings.presets import Preset
from gpud.state import SessionRow
from gpud.work.hostparts import HostParts
from gpud.work.journal import apply_times, monotonic_of
from gpud.work.removals import PendingRemovals
from gpud.work.sessions.manager import SessionManager
from gpud.work.sessions.record import Session, SessionState
from gpud.work.sessions.worker import LOST, SessionWorker, WorkerCrashed
from gpud.work.uids import WorkerIds, WorkerUser, parse_preset_user

logger = logging.getLogger(__name__)

# How long an adopted worker has to reconnect and say ready (it retries every 0.1 s while its own
# GPUD_WORKER_RECONNECT_SECONDS last; one that has given up has exited, which is noticed at once).
ADOPT_TIMEOUT_SECONDS = 20.0


@dataclass
class Candidate:
    """A session ready to be re-attached: leased, its uid reserved, its model held, its worker not yet back."""

    info: ContainerInfo
    session: Session
    user: WorkerUser
    worker: SessionWorker
    from_labels: bool  # no record of it was found: times and counters start from the container's


def gpu_by_uuid(inventory: GpuInventory, uuid: str | None) -> Gpu | None:
    """The managed GPU with this uuid (a container's gpud.gpu_uuid label)."""
    return next((gpu for gpu in inventory.gpus if uuid and gpu.uuid == uuid), None)


def worker_user(ids: WorkerIds, preset: Preset, labels: Mapping[str, str], holder: str) -> WorkerUser | None:
    """The user an adopted worker runs as: the preset's fixed one, else its labelled uid reserved for `holder`
    (None: another adopted worker holds that uid)."""
    if preset.user is not None:
        return parse_preset_user(preset.user)
    if not ids.can_switch:
        return WorkerUser(os.geteuid(), os.getegid())
    try:
        uid = int(labels.get(LABEL_UID, ""))
    except ValueError:
        return None
    return ids.reserve(uid, holder)


class SessionAdopter:
    """Turns running session containers back into sessions of the manager."""

    def __init__(self, host: HostParts, manager: SessionManager, removals: PendingRemovals) -> None:
        self._host = host
        self._manager = manager
        self._removals = removals

    def prepare(self, info: ContainerInfo, row: SessionRow | None) -> Candidate | str:
        """Lease, reserve and hold what the session needs; a string says why it cannot be adopted (the caller
        removes the container). No await: leases are taken in the caller's order."""
        labels = dict(info.labels)
        session_id = labels[LABEL_SESSION]
        try:
            preset = self._host.config.presets.get(labels.get(LABEL_MODEL, ""), labels.get(LABEL_PRESET, ""))
        except NotFound as exc:
            return f"its preset is no longer in the catalog ({exc.message})"
        gpu = gpu_by_uuid(self._host.inventory, labels.get(LABEL_GPU))
        if gpu is None:
            return f"its GPU {labels.get(LABEL_GPU)!r} is not one this gpud manages"
        try:
            lease = self._host.scheduler.adopt(gpu.index, session_id, "session", preset.model_id)
        except Conflict as exc:
            return f"a duplicate: {exc.message}"
        user = worker_user(self._host.ids, preset, labels, session_id)
        if user is None:
            self._host.scheduler.release(lease)
            return f"its uid {labels.get(LABEL_UID)!r} is missing or already another adopted worker's"
        session = Session(
            id=session_id, preset=preset, difficulty=row.difficulty if row else gpu.difficulty, lease=lease,
            clock=self._manager.clock, container_id=info.id,
        )  # fmt: skip
        self._restore_counters(session, info, row)
        try:
            self._host.store.acquire(preset.model_id, session_id)
        except NotFound:  # its mount keeps the files it uses; the cache just cannot protect them now
            logger.warning("session %s: model %s is no longer in the cache", session_id, preset.model_id)
        model_dir = self._host.store.path_for(preset.model_id)
        worker = self._manager.worker_for(session, labels.get(LABEL_TASK, ""), model_dir, user)
        return Candidate(info, session, user, worker, from_labels=row is None)

    def _restore_counters(self, session: Session, info: ContainerInfo, row: SessionRow | None) -> None:
        if row is not None:
            recorded = (row.gpu_uuid, row.model_id, row.preset)
            labelled = (session.lease.gpu.uuid, session.preset.model_id, session.preset.name)
            if recorded != labelled:  # the labels say what runs: they win
                logger.warning(
                    "session %s: recorded as %s, labelled %s; the labels win", session.id, recorded, labelled
                )
            apply_times(session, row)
            session.ended = None
            session.tasks_run, session.restarts = row.tasks_run, row.restarts
            session.ready_info = _loads(row.ready_info)
            return
        clock = session.clock
        session.created = monotonic_of(clock, info.created) if info.created else clock.monotonic()
        session.last_active = clock.monotonic()  # unknown: the idle timer starts again now
        logger.warning(
            "session %s: no record of it (the database is new or lost it); adopting container %s from its labels: "
            "created at its container's creation, idle timer restarted, counters from zero",
            session.id, info.id,
        )  # fmt: skip

    async def reattach(self, candidate: Candidate, timeout: float = ADOPT_TIMEOUT_SECONDS) -> float | None:
        """Wait for the worker to reconnect; on success the manager runs the session and the seconds it took are
        returned, else the container is stopped, everything released, the session recorded failed: None."""
        session, worker = candidate.session, candidate.worker
        started = time.monotonic()
        try:
            ready = await worker.reattach(candidate.info.id, timeout)
        except WorkerCrashed as crash:
            await self._lost(candidate, crash.describe())
            return None
        except Exception as exc:  # a bug must not leave the container, lease or uid behind
            logger.exception("session %s: adopting failed", session.id)
            await self._lost(candidate, f"internal error: {exc}")
            return None
        if not session.ready_info:
            session.ready_info = {"pid": ready.pid, "seconds_to_ready": round(ready.seconds_to_ready, 3), **ready.info}
        session.move(SessionState.READY)
        self._manager.adopt(session, worker, candidate.user)
        took = time.monotonic() - started
        logger.info(
            "session %s adopted in %.3fs: GPU %d, container %s, %d task(s) run before, model %s kept loaded%s",
            session.id, took, session.lease.gpu.index, candidate.info.id[:12], session.tasks_run,
            session.preset.model_id, "" if ready.resumed else " (the worker did not say it resumed)",
        )  # fmt: skip
        return took

    async def _lost(self, candidate: Candidate, why: str) -> None:
        session = candidate.session
        logger.warning("session %s: its worker did not come back after the restart (%s); stopping it", session.id, why)
        removed = await candidate.worker.stop()

        def gone() -> None:
            self._host.store.release(session.preset.model_id, session.id)
            self._host.scheduler.release(session.lease)
            self._host.ids.release(candidate.user)

        if removed:
            gone()
        else:  # it may still run: its GPU and uid stay held until a later removal succeeds
            self._removals.hold(candidate.info.id, f"session {session.id}", gone)
        session.end_reason = LOST
        session.move(SessionState.FAILED)
        self._manager.registry.add(session)  # so its id answers (failed, worker_lost), and it is recorded


def _loads(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
