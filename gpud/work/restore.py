"""Reconciliation at start, before any lease is granted: what survived gpud's last (unclean) exit is adopted or
removed, and the records are made to agree with the containers.

Container labels are the truth about what runs; the records database adds what labels cannot hold (timers,
counters, outcomes). With GPUD_LIVE_RESTORE on (the default), a running session container is adopted
(gpud/work/sessions/adopt.py), a one-off container is re-attached (its output read again from the start, its
outcome recorded); with it off, every leftover container is removed. Either way, tasks that were queued or
running in a session end `failed` (`gpud_restarted`), records of sessions without a container end
(`worker_lost`), directories that belong to nothing alive are deleted, and every mismatch is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpud.errors import GpudError
from gpud.runtime.base import (
    LABEL_GPU,
    LABEL_MANAGED,
    LABEL_SESSION,
    LABEL_TASK,
    LABEL_UID,
    ContainerInfo,
    ContainerRuntime,
    ContainerState,
)
from gpud.state import RecordsError, SessionRow
from gpud.work.hostparts import HostParts
from gpud.work.journal import Journal, session_from_row, task_from_row
from gpud.work.oneoff import OneOffRunner
from gpud.work.reattach import OneOffReattacher, Resume, fresh_log
from gpud.work.service import TaskService
from gpud.work.sessions.adopt import LOST, Candidate, SessionAdopter, gpu_by_uuid
from gpud.work.sessions.record import SessionState
from gpud.work.task import Task, TaskError, TaskStatus

logger = logging.getLogger(__name__)

RESTARTED = "gpud_restarted"
# How often a reconciliation that could not reach the engine at start is tried again.
RETRY_SECONDS = 2.0


@dataclass
class RestoreReport:
    """What one reconciliation did (logged, and read by tests for their figures)."""

    live_restore: bool
    containers: int = 0
    adopted_sessions: int = 0
    reattached_oneoffs: int = 0
    removed_containers: int = 0
    lost_sessions: int = 0
    failed_tasks: int = 0
    stale_dirs: int = 0
    seconds: float = 0.0
    adoption_seconds: list[float] = field(default_factory=list)


class Restorer:
    """Reads the records at start (load), then checks them against the engine's containers (reconcile)."""

    def __init__(
        self,
        host: HostParts,
        runtime: ContainerRuntime,
        journal: Journal,
        tasks: TaskService,
        oneoff: OneOffRunner,
        state_dir: Path,
    ) -> None:
        self._host = host
        self._runtime = runtime
        self._journal = journal
        self._tasks = tasks
        self._oneoff = oneoff
        self._state_dir = state_dir
        self._adopter = SessionAdopter(host, tasks.sessions, tasks.removals)
        self._open_tasks: dict[str, Task] = {}
        self._open_sessions: dict[str, SessionRow] = {}
        self._new_records = False
        self._oneoffs = OneOffReattacher(host, journal, tasks, open_tasks=self._open_tasks)
        self.report: RestoreReport | None = None

    # --- step 1: the records -----------------------------------------------------------------------------

    def load(self) -> None:
        """Register the tasks the records say were unfinished (each with a new log whose ids are above any issued
        before), so their ids answer and their clients can reattach; remember the sessions that were live."""
        db = self._journal.db
        if db is None:
            return
        self._new_records = db.created
        if db.created:
            logger.info("records: %s is new", db.path)
        try:
            sessions, tasks = db.open_sessions(), db.open_tasks()
        except RecordsError as exc:
            logger.error("%s; starting without the records of unfinished work", exc)
            return
        self._open_sessions = {row.id: row for row in sessions}
        for row in tasks:
            task = task_from_row(row, self._oneoffs.preset(row.model_id, row.preset))
            fresh_log(task, self._tasks)
            self._tasks.registry.add(task)
            self._open_tasks[task.id] = task
        if sessions or tasks:
            logger.info("records: %d session(s) and %d task(s) were live when gpud stopped", len(sessions), len(tasks))

    # --- step 2: the containers --------------------------------------------------------------------------

    async def first_try(self) -> bool:
        """Reconcile now (at start, before the API serves); False when the engine does not answer, and then no GPU
        is leased until reconcile_until_done() has reached it."""
        self._host.scheduler.withhold("gpud is checking which work survived its restart; try again shortly")
        try:
            await self.reconcile()
        except GpudError as exc:  # EngineUnavailable above all
            logger.warning("cannot reconcile with the engine yet (%s); no GPU is leased until it answers", exc)
            return False
        self._host.scheduler.withhold(None)
        return True

    async def reconcile_until_done(self) -> None:
        """Retry the reconciliation until the engine answers; then grant leases again."""
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            with contextlib.suppress(GpudError):
                await self.reconcile()
                break
        self._host.scheduler.withhold(None)

    async def reconcile(self) -> RestoreReport:
        """Adopt or remove every container of this instance, then settle the records; raises EngineUnavailable
        (before changing anything) when the engine cannot list its containers."""
        started = time.monotonic()
        live = self._host.config.settings.live_restore
        containers = sorted(await self._runtime.list({LABEL_MANAGED: "true"}), key=lambda c: c.created)
        report = RestoreReport(live_restore=live, containers=len(containers))
        if self._new_records and containers:
            logger.warning(
                "records: the database is new, yet %d container(s) of this gpud exist: what still runs is rebuilt "
                "from container labels alone",
                len(containers),
            )
        keep, doomed = _triage(containers, live)
        candidates: list[Candidate] = []
        resumes: list[Resume] = []
        for info in keep:  # oldest first: of two containers on one GPU, the one that was there first keeps it
            session_id = info.labels.get(LABEL_SESSION)
            got = (
                self._adopter.prepare(info, self._open_sessions.get(session_id))
                if session_id
                else self._oneoffs.prepare(info)
            )
            if isinstance(got, str):
                doomed.append((info, got))
            elif isinstance(got, Candidate):
                candidates.append(got)
            else:
                resumes.append(got)
        for resume in resumes:  # followed at once: their output and outcome need no reconnect
            self._tasks.spawn(
                self._oneoff.resume(resume.task, resume.lease, resume.user, resume.timeout_left), resume.task
            )
        report.reattached_oneoffs = len(resumes)
        removed = await asyncio.gather(*(self._remove(info, why) for info, why in doomed))
        report.removed_containers = sum(removed)
        took = await asyncio.gather(*(self._adopter.reattach(c) for c in candidates))
        report.adoption_seconds = [t for t in took if t is not None]
        report.adopted_sessions = len(report.adoption_seconds)
        report.lost_sessions = len(took) - report.adopted_sessions
        adopted = {c.session.id for c, t in zip(candidates, took, strict=True) if t is not None}
        report.failed_tasks = self._finish_leftovers(live)
        report.lost_sessions += self._end_session_rows({c.session.id for c in candidates}, live)
        keep_tasks = {r.task.id for r in resumes}
        report.stale_dirs = await asyncio.get_running_loop().run_in_executor(None, self._sweep, adopted, keep_tasks)
        report.seconds = time.monotonic() - started
        self.report = report
        _log_report(report)
        return report

    async def _remove(self, info: ContainerInfo, why: str) -> bool:
        """Remove a container that is not adopted. Should the engine refuse, it goes on the pending-removal list
        and, while it may still run, keeps a free GPU and uid of its labels reserved until it is gone."""
        owner = info.labels.get(LABEL_SESSION) or info.labels.get(LABEL_TASK) or "?"
        what = f"{'session' if LABEL_SESSION in info.labels else 'task'} {owner}"
        logger.warning("removing container %s of %s (%s): %s", info.id[:12], what, info.state.value, why)
        held = self._hold_for_removal(info) if info.state is ContainerState.RUNNING else None
        return await self._tasks.removals.remove(info.id, what, held)

    def _hold_for_removal(self, info: ContainerInfo) -> Callable[[], None]:
        gpu = gpu_by_uuid(self._host.inventory, info.labels.get(LABEL_GPU))
        holder = f"removal-{info.id[:12]}"
        lease = None
        if gpu is not None and self._host.scheduler.lease_of(gpu.index) is None:
            lease = self._host.scheduler.adopt(gpu.index, holder, "removal")
        user = None
        with contextlib.suppress(ValueError):
            user = self._host.ids.reserve(int(info.labels.get(LABEL_UID, "")), holder)

        def gone() -> None:
            if lease is not None:
                self._host.scheduler.release(lease)
            if user is not None:
                self._host.ids.release(user)

        return gone

    # --- settling the records ----------------------------------------------------------------------------

    def _finish_leftovers(self, live: bool) -> int:
        """Fail every task that was unfinished and was not re-attached; returns how many."""
        count = 0
        for task in self._open_tasks.values():
            if task.final:
                continue
            code, message = _leftover_error(task, live)
            if code == LOST:
                logger.warning("task %s: recorded %s, but its container is gone", task.id, task.status.value)
            task.finish(TaskStatus.FAILED, error=TaskError(code, message))
            count += 1
        self._open_tasks.clear()
        return count

    def _end_session_rows(self, handled: set[str], live: bool) -> int:
        """End the records of sessions that were live and were not adopted (nor tried); returns how many."""
        count = 0
        for session_id, row in self._open_sessions.items():
            if session_id in handled:
                continue
            session = session_from_row(row, self._tasks.sessions.clock)
            session.state = SessionState.FAILED if live else SessionState.STOPPED
            session.end_reason = LOST if live else RESTARTED
            session.ended = session.clock.monotonic()
            self._journal.session_changed(session)
            if live:
                logger.warning("session %s: recorded live, but no running container of it was adopted; ended", row.id)
            count += 1
        self._open_sessions.clear()
        return count

    def _sweep(self, sessions: set[str], tasks: set[str]) -> int:
        """Delete directories under state/sessions and state/tasks that belong to nothing alive."""
        removed = 0
        for sub, keep in (("sessions", {s[:16] for s in sessions}), ("tasks", tasks)):
            root = self._state_dir / sub
            with contextlib.suppress(FileNotFoundError), os.scandir(root) as entries:
                for entry in entries:
                    if entry.name in keep:
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path)
                        else:
                            os.unlink(entry.path)
                        removed += 1
                    except OSError as exc:
                        logger.warning("cannot remove stale %s: %s", entry.path, exc)
        if removed:
            logger.info("removed %d stale director(ies) of sessions and tasks no longer alive", removed)
        return removed


def _triage(containers: list[ContainerInfo], live: bool) -> tuple[list[ContainerInfo], list[tuple[ContainerInfo, str]]]:
    """Split containers into those to adopt (the newest of each session's, oldest first) and those to remove."""
    keep: list[ContainerInfo] = []
    doomed: list[tuple[ContainerInfo, str]] = []
    newest: dict[str, ContainerInfo] = {}
    for info in containers:
        session_id = info.labels.get(LABEL_SESSION)
        if not live:
            doomed.append((info, "live restore is off (GPUD_LIVE_RESTORE=false)"))
        elif session_id and info.state is not ContainerState.RUNNING:
            doomed.append((info, f"its worker is not running ({info.state.value})"))
        elif not session_id and info.state not in (ContainerState.RUNNING, ContainerState.EXITED):
            doomed.append((info, f"it never ran ({info.state.value})"))
        elif not session_id and not info.labels.get(LABEL_TASK):
            doomed.append((info, "it has no task label"))
        elif session_id:
            if session_id in newest:  # sorted by creation: the later one is the session's latest worker
                doomed.append((newest[session_id], "a duplicate: a newer container of the same session runs"))
            newest[session_id] = info
        else:
            keep.append(info)
    keep.extend(newest.values())
    keep.sort(key=lambda c: c.created)
    return keep, doomed


def _leftover_error(task: Task, live: bool) -> tuple[str, str]:
    if task.session_id is not None:
        return RESTARTED, (
            f"gpud restarted while the task was {task.status.value} in session {task.session_id}; its stream could"
            " not go on, and the worker stopped it"
        )
    if not live:
        return RESTARTED, "gpud restarted with GPUD_LIVE_RESTORE=false; the task's container was removed"
    if task.status is TaskStatus.QUEUED:
        return RESTARTED, "gpud restarted before the task's container started"
    return LOST, "gpud restarted and the task's container was gone"


def _log_report(report: RestoreReport) -> None:
    logger.info(
        "reconciled %d container(s) in %.3fs (live restore %s): %d session(s) adopted, %d one-off(s) re-attached, "
        "%d container(s) removed, %d session(s) lost, %d unfinished task(s) failed, %d stale director(ies) removed",
        report.containers, report.seconds, "on" if report.live_restore else "off", report.adopted_sessions,
        report.reattached_oneoffs, report.removed_containers, report.lost_sessions, report.failed_tasks,
        report.stale_dirs,
    )  # fmt: skip
