"""The worker protocol: wire format (protocol), gpud's side (channel), and the in-container SDK (sdk)."""

from __future__ import annotations

from pathlib import Path

from gpud.worker.protocol import (
    CONTAINER_SDK_DIR,
    CONTAINER_SDK_PATH,
    CONTAINER_SOCKET_DIR,
    CONTAINER_SOCKET_PATH,
    DEFAULT_RECONNECT_SECONDS,
    ENV_RECONNECT_SECONDS,
    ENV_SOCKET,
)


def sdk_source_path() -> Path:
    """The host file the runtime bind-mounts read-only at CONTAINER_SDK_PATH."""
    return Path(__file__).with_name("sdk.py")


def session_worker_env(
    own_pythonpath: str | None = None, reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS
) -> dict[str, str]:
    """Environment a session container needs to find gpud's socket and import gpud_worker; the SDK's directory
    comes first on PYTHONPATH, then `own_pythonpath` (the preset's) when given. `reconnect_seconds` is how long
    the worker waits for a restarted gpud before it exits (0: it exits when its connection ends)."""
    pythonpath = f"{CONTAINER_SDK_DIR}:{own_pythonpath}" if own_pythonpath else CONTAINER_SDK_DIR
    return {
        ENV_SOCKET: CONTAINER_SOCKET_PATH,
        "PYTHONPATH": pythonpath,
        ENV_RECONNECT_SECONDS: f"{reconnect_seconds:g}",
    }


__all__ = [
    "CONTAINER_SDK_DIR",
    "CONTAINER_SDK_PATH",
    "CONTAINER_SOCKET_DIR",
    "CONTAINER_SOCKET_PATH",
    "sdk_source_path",
    "session_worker_env",
]
