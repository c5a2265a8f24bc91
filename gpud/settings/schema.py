"""Every setting gpud reads, each declared once: type, default, environment names, parser, reloadability, help.

Loading (gpud.settings.load), `gpud check-config`, reload (which settings apply live) and the README's settings
table (gpud.settings.reference) are all derived from the declarations below. The YAML key is the field name.
The original design's environment names (`GPU_DEVICE_IDS`, ...) stay valid; settings added since use `GPUD_`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpud.settings import parsers as p
from gpud.settings.images import ImagePolicy

_SPEC_KEY = "gpud.setting"


@dataclass(frozen=True)
class SettingSpec:
    """How one setting is read and documented."""

    env: tuple[str, ...]
    parse: Callable[[Any], Any]
    help: str
    reloadable: bool
    secret: bool = False
    # The README's default column, when the default value alone would say little (e.g. "all NVML GPUs").
    shown_default: str | None = None


def setting(
    default: Any = None,
    *,
    env: str,
    parse: Callable[[Any], Any],
    help: str,
    reload: bool = False,
    secret: bool = False,
    shown: str | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """Declare one setting as a dataclass field carrying its SettingSpec."""
    spec = SettingSpec((env,), parse, help, reload, secret, shown)
    metadata = {_SPEC_KEY: spec}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


@dataclass(frozen=True)
class Settings:
    """Every setting gpud reads. Built by `gpud.settings.load.load()`, which validates all of it."""

    # GPUs
    gpu_device_ids: tuple[int, ...] = setting(
        (), env="GPU_DEVICE_IDS", parse=p.gpu_ids, shown="all NVML GPUs",
        help="GPUs to manage, e.g. `0,1` (required with the static backend)",
    )  # fmt: skip
    gpu_device_difficulty: Mapping[int, str] = setting(
        env="GPU_DEVICE_DIFFICULTY", parse=p.difficulty_map, reload=True, factory=dict, shown="every GPU `low`",
        help="tags, e.g. `0:low,1:high`; an unknown GPU id is an error",
    )  # fmt: skip
    gpu_metrics_refresh_interval: float = setting(
        5.0, env="GPU_METRICS_REFRESH_INTERVAL", parse=p.seconds, reload=True, help="seconds between NVML samples"
    )
    # Sessions and tasks
    session_idle_timeout_seconds: float = setting(
        300.0, env="SESSION_IDLE_TIMEOUT_SECONDS", parse=p.seconds, reload=True,
        help="idle time (since last task or keepalive) before a session ends",
    )  # fmt: skip
    session_max_lifetime_seconds: float = setting(
        3600.0, env="SESSION_MAX_LIFETIME_SECONDS", parse=p.seconds, reload=True,
        help="after this a session takes no tasks and ends after the running one",
    )  # fmt: skip
    session_queue_max_size: int = setting(
        5,
        env="SESSION_QUEUE_MAX_SIZE",
        parse=p.positive_int,
        reload=True,
        help="tasks waiting per session; more get 429",
    )
    session_evict_idle: bool = setting(
        True, env="GPUD_SESSION_EVICT_IDLE", parse=p.boolean, reload=True,
        help="when every GPU of a tier is held by idle sessions, new work for it ends the least recently used one"
        " and takes its GPU (its id then answers 410 `session_evicted`); `false`: 503 until one ends",
    )  # fmt: skip
    # Models
    file_service_url: str | None = setting(
        env="FILE_SERVICE_URL", parse=p.url, reload=True, shown="none", help="where models are fetched from"
    )
    file_service_internal_key: str | None = setting(
        env="FILE_SERVICE_INTERNAL_KEY", parse=p.optional_text, reload=True, secret=True, shown="none",
        help="sent to the file service in the key header (`_FILE` variant reads it from a file)",
    )  # fmt: skip
    internal_api_key: tuple[str, ...] = setting(
        (), env="INTERNAL_API_KEY", parse=p.api_keys, reload=True, secret=True, shown="none",
        help="API key(s) for the public API, comma-separated (`_FILE` variant: one per line)",
    )  # fmt: skip
    auto_fetch_models: bool = setting(
        True, env="AUTO_FETCH_MODELS", parse=p.boolean, reload=True, help="fetch models missing from the cache"
    )
    model_cache_dir: Path = setting(
        Path("/var/lib/gpud/models"), env="MODEL_CACHE_DIR", parse=p.path, help="one directory per model"
    )
    allowed_docker_images: ImagePolicy = setting(
        ImagePolicy(), env="ALLOWED_DOCKER_IMAGES", parse=p.image_policy, reload=True, shown="none (nothing runs)",
        help="comma-separated globs, optional `@sha256:` pins (checked at load)",
    )  # fmt: skip
    default_task_timeout: float = setting(
        300.0, env="DEFAULT_TASK_TIMEOUT", parse=p.seconds, reload=True, help="seconds, when a task gives none"
    )
    max_task_timeout: float = setting(
        3600.0, env="MAX_TASK_TIMEOUT", parse=p.seconds, reload=True, help="larger `timeout_seconds` is a 400"
    )
    # Service
    http_listen: tuple[str, int] = setting(
        ("127.0.0.1", 8001), env="GPUD_HTTP_LISTEN", parse=p.listen_address, shown="127.0.0.1:8001",
        help="public API address",
    )  # fmt: skip
    admin_socket: Path = setting(
        Path("/run/gpud/gpud.sock"), env="GPUD_ADMIN_SOCKET", parse=p.path, help="admin API (mode 0660)"
    )
    admin_socket_group: str | None = setting(
        env="GPUD_ADMIN_SOCKET_GROUP", parse=p.optional_text, shown="none", help="group that may use the admin socket"
    )
    presets_file: Path = setting(
        Path("/etc/gpud/models.yaml"), env="GPUD_PRESETS_FILE", parse=p.path, reload=True, help="model presets"
    )
    gpu_backend: str = setting(
        "auto", env="GPUD_GPU_BACKEND", parse=p.choice("auto", "nvml", "static"),
        help="`auto` (NVML, else static with a log line) \\| `nvml` \\| `static`",
    )  # fmt: skip
    runtime: str = setting(
        "podman", env="GPUD_RUNTIME", parse=p.choice("podman", "docker", "process"),
        help="`podman` \\| `docker` \\| `process` (no isolation; development only)",
    )  # fmt: skip
    runtime_socket: str | None = setting(
        env="GPUD_RUNTIME_SOCKET", parse=p.engine_socket, shown="engine default",
        help="the engine's API socket: a path or `unix:///path`",
    )  # fmt: skip
    state_dir: Path = setting(
        Path("/var/lib/gpud"), env="GPUD_STATE_DIR", parse=p.path, help="worker sockets, task inputs, the SDK copy"
    )
    worker_uid_range: tuple[int, int] = setting(
        (2_000_000_000, 2_000_065_535), env="GPUD_WORKER_UID_RANGE", parse=p.id_range, shown="2000000000-2000065535",
        help="host uids (gid = uid) given one per worker, so workers cannot reach each other's sockets and inputs",
    )  # fmt: skip
    process_runtime_allow_unisolated: bool = setting(
        False, env="GPUD_PROCESS_ALLOW_UNISOLATED", parse=p.boolean,
        help="let the process runtime start workers without `unshare --net` (shared network; as gpud's user if "
        "not root); /health says degraded",
    )  # fmt: skip
    worker_reconnect_seconds: float = setting(
        60.0, env="GPUD_WORKER_RECONNECT_SECONDS", parse=p.seconds_or_zero,
        help="a session worker whose connection to gpud ends without `shutdown` (gpud killed) keeps its model and "
        "tries this long to reconnect to the restarted gpud; `0`: it exits at once",
    )  # fmt: skip
    model_cache_max_bytes: int | None = setting(
        env="GPUD_MODEL_CACHE_MAX_BYTES", parse=p.optional_size, shown="none",
        help="cache size limit (LRU eviction of unused models)",
    )  # fmt: skip
    model_archive_max_bytes: int | None = setting(
        1 << 40, env="GPUD_MODEL_ARCHIVE_MAX_BYTES", parse=p.optional_size, reload=True, shown="1t",
        help="a model (download, or archive unpacked) larger than this is refused (`none`: only the cache limit)",
    )  # fmt: skip
    model_archive_max_ratio: int | None = setting(
        50, env="GPUD_MODEL_ARCHIVE_MAX_RATIO", parse=p.optional_positive_int, reload=True,
        help="an archive may unpack to at most this many times its download size, plus 16 MiB (`none`: no cap)",
    )  # fmt: skip
    model_archive_max_entries: int = setting(
        20_000, env="GPUD_MODEL_ARCHIVE_MAX_ENTRIES", parse=p.positive_int, reload=True,
        help="files, directories and links in one model archive",
    )  # fmt: skip
    model_archive_max_depth: int = setting(
        32, env="GPUD_MODEL_ARCHIVE_MAX_DEPTH", parse=p.positive_int, reload=True,
        help="path components of one archive entry",
    )  # fmt: skip
    model_archive_max_path: int = setting(
        1024, env="GPUD_MODEL_ARCHIVE_MAX_PATH", parse=p.positive_int, reload=True,
        help="bytes in one archive entry's path or link target (each name at most 255)",
    )  # fmt: skip
    model_fetch_min_rate: int | None = setting(
        64 * 1024, env="GPUD_MODEL_FETCH_MIN_RATE", parse=p.optional_size, reload=True, shown="64k",
        help="bytes/s a model download must average over each rate window, else it fails (`none`: no minimum)",
    )  # fmt: skip
    model_fetch_rate_window: float = setting(
        30.0, env="GPUD_MODEL_FETCH_RATE_WINDOW", parse=p.seconds, reload=True,
        help="seconds over which the minimum fetch rate is measured",
    )  # fmt: skip
    model_fetch_deadline: float | None = setting(
        6 * 3600.0, env="GPUD_MODEL_FETCH_DEADLINE", parse=p.optional_seconds, reload=True, shown="21600",
        help="seconds a model fetch may take in all, retries included (`none`: no limit)",
    )  # fmt: skip
    file_service_key_header: str = setting(
        "X-Internal-Key", env="GPUD_FILE_SERVICE_KEY_HEADER", parse=p.non_empty_text, reload=True,
        help="header that carries FILE_SERVICE_INTERNAL_KEY",
    )  # fmt: skip
    client_gone_grace_seconds: float = setting(
        30.0, env="GPUD_CLIENT_GONE_GRACE_SECONDS", parse=p.seconds, reload=True,
        help="a task with no client for this long is cancelled",
    )  # fmt: skip
    task_retention_seconds: float = setting(
        600.0, env="GPUD_TASK_RETENTION_SECONDS", parse=p.seconds, reload=True,
        help="finished tasks stay in memory (listed, and their whole stream replayable) this long; then they "
        "answer from the records (`GPUD_RECORD_RETENTION_SECONDS`)",
    )  # fmt: skip
    live_restore: bool = setting(
        True, env="GPUD_LIVE_RESTORE", parse=p.boolean,
        help="after an unclean exit (kill -9, watchdog, crash) the next start adopts the sessions and one-offs "
        "still running; `false` removes them (a clean stop always ends them)",
    )  # fmt: skip
    record_retention_seconds: float = setting(
        86400.0, env="GPUD_RECORD_RETENTION_SECONDS", parse=p.seconds, reload=True,
        help="finished tasks and ended sessions stay in the records database (`<state_dir>/gpud.db`) this long, "
        "and answer after a restart",
    )  # fmt: skip
    sse_heartbeat_seconds: float = setting(
        15.0, env="GPUD_SSE_HEARTBEAT_SECONDS", parse=p.seconds, reload=True, help="comment heartbeat on idle streams"
    )
    sse_send_timeout_seconds: float = setting(
        30.0, env="GPUD_SSE_SEND_TIMEOUT_SECONDS", parse=p.seconds, reload=True,
        help="an SSE client that takes no data for this long is dropped (it may resume with Last-Event-ID)",
    )  # fmt: skip
    task_output_max_bytes: int = setting(
        16 * 1024 * 1024, env="GPUD_TASK_OUTPUT_MAX_BYTES", parse=p.parse_size, reload=True, shown="16m",
        help="text output kept per task (deltas and `text`); the rest is cut and the task told so in a `logs` line",
    )  # fmt: skip
    task_logs_max_bytes: int = setting(
        4 * 1024 * 1024, env="GPUD_TASK_LOGS_MAX_BYTES", parse=p.parse_size, reload=True, shown="4m",
        help="`logs` and `progress` events kept per task; later ones are dropped and counted",
    )  # fmt: skip
    log_line_max_bytes: int = setting(
        16 * 1024, env="GPUD_LOG_LINE_MAX_BYTES", parse=p.parse_size, reload=True, shown="16k",
        help="one `logs` line; longer lines are cut with a marker",
    )  # fmt: skip
    text_delta_max_bytes: int = setting(
        64 * 1024, env="GPUD_TEXT_DELTA_MAX_BYTES", parse=p.parse_size, reload=True, shown="64k",
        help="one `text_delta` event; longer text is split into several (nothing is lost)",
    )  # fmt: skip
    task_retention_max_bytes: int = setting(
        512 * 1024 * 1024, env="GPUD_TASK_RETENTION_MAX_BYTES", parse=p.parse_size, reload=True, shown="512m",
        help="events and output kept for finished tasks in all; past it the oldest are released early",
    )  # fmt: skip
    metrics_public: bool = setting(
        False, env="GPUD_METRICS_PUBLIC", parse=p.boolean, reload=True, help="serve `/metrics` without an API key"
    )
    metrics_created_series: bool = setting(
        False, env="GPUD_METRICS_CREATED_SERIES", parse=p.boolean,
        help="export the `_created` series of counters and histograms (off: Prometheus needs none of them)",
    )  # fmt: skip
    max_request_bytes: int = setting(
        1024 * 1024, env="GPUD_MAX_REQUEST_BYTES", parse=p.parse_size, shown="1m", help="larger bodies get 413"
    )
    max_connections: int = setting(
        1024, env="GPUD_MAX_CONNECTIONS", parse=p.positive_int,
        help="open connections on the public API; more get 503 (lowered at start to fit the fd limit)",
    )  # fmt: skip
    admin_max_connections: int = setting(
        64, env="GPUD_ADMIN_MAX_CONNECTIONS", parse=p.positive_int,
        help="open connections on the admin socket, counted apart from the public ones",
    )  # fmt: skip
    header_timeout_seconds: float = setting(
        10.0, env="GPUD_HEADER_TIMEOUT_SECONDS", parse=p.seconds,
        help="a connection must send a whole request head within this, or it is closed",
    )  # fmt: skip
    http_idle_timeout_seconds: float = setting(
        30.0, env="GPUD_HTTP_IDLE_TIMEOUT_SECONDS", parse=p.seconds,
        help="a keep-alive connection idle this long between requests is closed",
    )  # fmt: skip
    body_timeout_seconds: float = setting(
        30.0, env="GPUD_BODY_TIMEOUT_SECONDS", parse=p.seconds,
        help="a request body (task submission) not received within this gets 408",
    )  # fmt: skip
    log_level: str = setting(
        "info", env="GPUD_LOG_LEVEL", parse=p.choice("debug", "info", "warning", "error"), reload=True,
        help="debug, info, warning, error",
    )  # fmt: skip
    log_format: str = setting(
        "text", env="GPUD_LOG_FORMAT", parse=p.choice("text", "json"),
        help="`text` (a line per record) \\| `json` (an object per line: ts, level, logger, message, task_id, "
        "session_id)",
    )  # fmt: skip
    # Fleet mode (docs/fleet.md): several gpud hosts coordinated through etcd; off while no endpoint is given
    etcd_endpoints: tuple[str, ...] = setting(
        (), env="GPUD_ETCD_ENDPOINTS", parse=p.url_list, shown="none (single host)",
        help="etcd client URLs, comma-separated (e.g. `http://10.0.0.1:2379,http://10.0.0.2:2379`); set: fleet mode",
    )  # fmt: skip
    host_id: str | None = setting(
        env="GPUD_HOST_ID", parse=p.optional_text, shown="the hostname",
        help="this host's name in the fleet (letters, digits, `.`, `_`, `-`)",
    )  # fmt: skip
    advertise_url: str | None = setting(
        env="GPUD_ADVERTISE_URL", parse=p.url, shown="http://<http_listen>",
        help="the public API URL other fleet hosts forward requests to",
    )  # fmt: skip
    fleet_key: str | None = setting(
        env="GPUD_FLEET_KEY", parse=p.optional_text, secret=True, shown="none",
        help="shared by the fleet's hosts, sent on forwarded requests (required in fleet mode; `_FILE` variant)",
    )  # fmt: skip
    etcd_lease_ttl_seconds: int = setting(
        5, env="GPUD_ETCD_LEASE_TTL_SECONDS", parse=p.positive_int,
        help="a host that stops renewing its etcd lease this long is gone: its sessions answer 410",
    )  # fmt: skip
    fleet_record_ttl_seconds: int = setting(
        86400, env="GPUD_FLEET_RECORD_TTL_SECONDS", parse=p.positive_int,
        help="how long after a host is gone any host (even one that joined later) still answers 410 host_lost, "
        "not 404, for its sessions and tasks (their durable owner records live this long)",
    )  # fmt: skip
    etcd_ca_file: Path | None = setting(
        env="GPUD_ETCD_CA_FILE", parse=p.optional_path, shown="none", help="CA bundle for https etcd endpoints"
    )
    etcd_cert_file: Path | None = setting(
        env="GPUD_ETCD_CERT_FILE", parse=p.optional_path, shown="none", help="client certificate for etcd (TLS)"
    )
    etcd_key_file: Path | None = setting(
        env="GPUD_ETCD_KEY_FILE", parse=p.optional_path, shown="none", help="the client certificate's private key"
    )
    etcd_username: str | None = setting(
        env="GPUD_ETCD_USERNAME", parse=p.optional_text, shown="none", help="etcd user (etcd auth enabled)"
    )
    etcd_password: str | None = setting(
        env="GPUD_ETCD_PASSWORD", parse=p.optional_text, secret=True, shown="none",
        help="the etcd user's password (`_FILE` variant reads it from a file)",
    )  # fmt: skip
    # Not a setting: the YAML file the values were read from, if any (for messages).
    config_file: Path | None = None

    def changed_fields(self, other: Settings) -> list[str]:
        """Names of the settings whose values differ between self and other."""
        return [name for name in SPECS if getattr(self, name) != getattr(other, name)]

    def with_values(self, values: Mapping[str, Any]) -> Settings:
        """A copy with some settings replaced (reload applies only the reloadable ones)."""
        return dataclasses.replace(self, **values)


# name -> spec, in declaration order (the README table's order).
SPECS: dict[str, SettingSpec] = {
    f.name: f.metadata[_SPEC_KEY] for f in dataclasses.fields(Settings) if _SPEC_KEY in f.metadata
}
# Settings that a reload (SIGHUP) changes in place; the rest need a restart.
RELOADABLE = frozenset(name for name, spec in SPECS.items() if spec.reloadable)


def default_of(name: str) -> Any:
    """The built-in default of a setting."""
    fld = next(f for f in dataclasses.fields(Settings) if f.name == name)
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    return fld.default
