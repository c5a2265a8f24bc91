"""Gauges computed at scrape time from the daemon's live objects: sessions, tasks, the model cache (GPUs:
gpu_metrics.py). Each state gauge emits every state, 0 included, so no series vanishes."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from gpud.modelstore import ModelStore
from gpud.work.registry import TaskRegistry
from gpud.work.sessions.record import SessionRegistry, SessionState
from gpud.work.task import FINAL, TaskStatus

ACTIVE = (TaskStatus.QUEUED, TaskStatus.RUNNING)
RETAINED = tuple(status for status in TaskStatus if status in FINAL)


class StateCollector:
    """Gauges computed at scrape time from the daemon's live objects."""

    def __init__(self, tasks: TaskRegistry, sessions: SessionRegistry, store: ModelStore | None = None) -> None:
        self._tasks = tasks
        self._sessions = sessions
        self._store = store

    def describe(self) -> list[Metric]:
        """No fixed description: the families are produced per scrape."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Sessions by state, live and retained tasks by status, queued tasks, the model cache's size."""
        by_state = Tally(s.state.value for s in self._sessions.all())
        sessions = GaugeMetricFamily(
            "gpud_sessions", "Known sessions (live and recently ended) by state", labels=["state"]
        )
        for state in SessionState:
            sessions.add_metric([state.value], by_state[state.value])
        yield sessions
        by_status = Tally(t.status for t in self._tasks.all())
        active = GaugeMetricFamily("gpud_tasks_active", "Tasks queued or running", labels=["status"])
        retained = GaugeMetricFamily(
            "gpud_tasks_retained",
            "Finished tasks still kept in memory (GPUD_TASK_RETENTION_SECONDS)",
            labels=["status"],
        )
        for family, statuses in ((active, ACTIVE), (retained, RETAINED)):
            for status in statuses:
                family.add_metric([status.value], by_status[status])
            yield family
        queued = sum(len(s.queue) for s in self._sessions.live())
        yield GaugeMetricFamily("gpud_session_queued_tasks", "Tasks waiting in session queues", value=queued)
        if self._store is not None:
            yield from self._cache(self._store)

    @staticmethod
    def _cache(store: ModelStore) -> Iterator[Metric]:
        used = sum(model.size_bytes or 0 for model in store.list() if model.complete)
        yield GaugeMetricFamily("gpud_model_cache_bytes", "Bytes of the models in the cache", value=used)
        if store.max_bytes is not None:  # no series without a limit (0 would read as "full")
            yield GaugeMetricFamily(
                "gpud_model_cache_limit_bytes",
                "The cache's size limit (GPUD_MODEL_CACHE_MAX_BYTES)",
                value=store.max_bytes,
            )
