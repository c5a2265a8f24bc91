"""The `podman run` that Podman's Quadlet generator makes from a `.container` unit, for the keys gpud's unit uses.

Podman 4.3 (Debian 12) has no Quadlet, so the container test runs this command instead. The mapping follows
podman-systemd.unit(5) of Podman 4.4; the options Quadlet adds only under systemd (--cidfile=%t/%N.cid,
--cgroups=split, --sdnotify=conmon) are left out, since the test runs the container directly. A key this module does
not know is an error: the unit file cannot use something the test does not run.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

# Key -> how its value becomes options (a value of "true" for the boolean ones).
_FLAGS = {
    "NoNewPrivileges": ["--security-opt", "no-new-privileges"],
    "ReadOnly": ["--read-only"],
    "VolatileTmp": ["--tmpfs", "/tmp:rw,size=512M,mode=1777"],
    "SecurityLabelDisable": ["--security-opt", "label=disable"],
    # Under systemd, Quadlet passes NOTIFY_SOCKET into the container; run directly, there is none to pass.
    "Notify": [],
}


def podman_run_args(
    unit: Path, name: str, paths: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
) -> list[str]:
    """`podman run ...` for the unit, named `name`; `paths` replaces host paths (volume sources and targets alike,
    so they stay identical; a socket's target keeps its path) and `env` adds or overrides variables."""
    lines: dict[str, list[str]] = {}
    for key, value in _entries(unit):
        lines.setdefault(key, []).append(value)
    args = ["podman", "run", "--name", name, "--replace", "--rm", "-d"]
    image = None
    environment: dict[str, str] = {}
    for key, values in lines.items():
        for value in values:
            if key == "Image":
                image = value
            elif key == "ContainerName":
                continue  # the caller's name instead: runs must not collide
            elif key == "Network":
                args += ["--network", value]
            elif key == "DropCapability":
                args += [a for cap in value.split() for a in ("--cap-drop", cap.lower())]
            elif key == "AddCapability":
                args += [a for cap in value.split() for a in ("--cap-add", cap.lower())]
            elif key == "Volume":
                args += ["-v", _volume(value, paths or {})]
            elif key == "Environment":
                environment.update(item.split("=", 1) for item in shlex.split(value))  # type: ignore[misc]
            elif key == "PodmanArgs":
                args += shlex.split(value)
            elif key in _FLAGS:
                if value.strip().lower() in ("true", "yes", "1"):
                    args += _FLAGS[key]
            else:
                raise ValueError(f"{unit}: [Container] {key}= is not translated by tests/e2e/quadlet.py")
    environment.update(env or {})
    for key, value in environment.items():
        args += ["--env", f"{key}={value}"]
    if image is None:
        raise ValueError(f"{unit}: no Image=")
    return [*args, image]


def _entries(unit: Path) -> list[tuple[str, str]]:
    """The [Container] section's key=value lines in order (keys repeat, so no dict parser)."""
    section = None
    found = []
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Container":
            key, _, value = line.partition("=")
            found.append((key.strip(), value.strip()))
    return found


def _volume(value: str, paths: Mapping[str, str]) -> str:
    source, _, rest = value.partition(":")
    target, _, options = rest.partition(":")
    if source in paths:
        new = paths[source]
        # A directory is named alike inside and out; a socket (a file) keeps its path inside.
        target = target if source.endswith(".sock") else new
        source = new
    return ":".join(part for part in (source, target, options) if part)
