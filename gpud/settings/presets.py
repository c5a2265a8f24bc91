"""Model presets (models.yaml): model -> preset -> image, command, environment, limits.

The file keeps the original design's shape, so a file written for it keeps working::

    models:
      llama-7b:
        inference:
          docker_image: "llm-runner:latest"
          command: ["python", "inference.py"]
          env_vars: {MODEL_NAME: "llama-7b"}

Every field added since is optional with a default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpud.errors import ConfigError, NotFound

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SIZE_RE = re.compile(r"^(\d+)([kmgt]?)b?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id" to the kernel


def parse_size(value: object) -> int:
    """Parse '16g', '512m', '1024' (bytes) into bytes; raise ValueError on anything else."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive: {value}")
        return value
    match = _SIZE_RE.match(str(value).strip())
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 512m, 16g)")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size <= 0:
        raise ValueError(f"size must be positive: {value!r}")
    return size


@dataclass(frozen=True)
class Limits:
    """Resource limits for one worker container."""

    memory_bytes: int = 16 * 1024**3
    cpus: float = 1.0
    pids: int = 512
    shm_bytes: int = 1024**3
    tmpfs_bytes: int = 256 * 1024**2


@dataclass(frozen=True)
class Preset:
    """How to run one model for one kind of task."""

    model_id: str
    name: str
    image: str
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    # session: keeps a long-lived worker speaking the worker protocol; oneoff: a process per task; any: both.
    mode: str = "any"
    readiness_timeout_seconds: float = 300.0
    # None: the worker runs as a host uid of its own (GPUD_WORKER_UID_RANGE); "root"/"0" must be asked for;
    # otherwise a numeric "uid" or "uid:gid". Names are refused: gpud must know the host uid to own the
    # worker's directories, and a name means whatever the image's /etc/passwd says.
    user: str | None = None

    @property
    def key(self) -> str:
        """`model_id/preset`, as used in messages."""
        return f"{self.model_id}/{self.name}"


_PRESET_KEYS = {
    "docker_image",
    "image",
    "command",
    "env_vars",
    "env",
    "limits",
    "mode",
    "readiness_timeout_seconds",
    "user",
}
_LIMIT_KEYS = {"memory", "cpus", "pids", "shm_size", "tmpfs_size"}
_MODES = {"session", "oneoff", "any"}


@dataclass(frozen=True)
class PresetCatalog:
    """All presets, looked up by model and preset name."""

    presets: Mapping[str, Mapping[str, Preset]]
    source: str = "<built-in>"

    def get(self, model_id: str, preset: str) -> Preset:
        """The preset, or NotFound naming what is missing."""
        presets = self.presets.get(model_id)
        if presets is None:
            raise NotFound(f"unknown model {model_id!r}", code="model_not_found")
        found = presets.get(preset)
        if found is None:
            raise NotFound(f"model {model_id!r} has no preset {preset!r}", code="preset_not_found")
        return found

    def all(self) -> list[Preset]:
        """Every preset, sorted by model then name."""
        return [p for model in sorted(self.presets) for _, p in sorted(self.presets[model].items())]

    def images(self) -> set[str]:
        """Every image some preset names."""
        return {p.image for p in self.all()}


def load_presets(path: Path) -> PresetCatalog:
    """Read and validate a presets file; ConfigError lists every problem with model and preset named."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read presets file: {exc.strerror or exc}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    return parse_presets(data, source=str(path))


def parse_presets(data: Any, source: str) -> PresetCatalog:
    """Validate the parsed YAML document of a presets file."""
    if not isinstance(data, dict) or set(data) - {"models"}:
        raise ConfigError([f"{source}: expected a mapping with one key 'models'"])
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise ConfigError([f"{source}: 'models' must be a mapping of model id to presets"])
    problems: list[str] = []
    catalog: dict[str, dict[str, Preset]] = {}
    for model_id, presets in models.items():
        if not isinstance(model_id, str) or not _NAME_RE.match(model_id):
            problems.append(f"{source}: models.{model_id}: model id must match {_NAME_RE.pattern}")
            continue
        if not isinstance(presets, dict) or not presets:
            problems.append(f"{source}: models.{model_id}: expected a mapping of preset name to preset")
            continue
        catalog[model_id] = {}
        for name, raw in presets.items():
            where = f"{source}: models.{model_id}.{name}"
            try:
                catalog[model_id][str(name)] = _parse_preset(model_id, str(name), raw)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
    if problems:
        raise ConfigError(problems)
    return PresetCatalog(presets=catalog, source=source)


def _parse_preset(model_id: str, name: str, raw: Any) -> Preset:
    if not _NAME_RE.match(name):
        raise ValueError(f"preset name must match {_NAME_RE.pattern}")
    if not isinstance(raw, dict):
        raise ValueError("expected a mapping")
    unknown = set(raw) - _PRESET_KEYS
    if unknown:
        raise ValueError(f"unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    image = raw.get("docker_image", raw.get("image"))
    if not isinstance(image, str) or not image.strip():
        raise ValueError("docker_image is required (the worker image to run)")
    command = raw.get("command", [])
    if isinstance(command, str):
        command = [command]
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise ValueError("command must be a list of strings")
    env = raw.get("env_vars", raw.get("env", {})) or {}
    if not isinstance(env, dict):
        raise ValueError("env_vars must be a mapping")
    mode = raw.get("mode", "any")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(sorted(_MODES))}")
    timeout = raw.get("readiness_timeout_seconds", 300)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ValueError("readiness_timeout_seconds must be a positive number")
    user = _parse_user(raw.get("user"))
    return Preset(
        model_id=model_id,
        name=name,
        image=image.strip(),
        command=tuple(command),
        env={str(k): str(v) for k, v in env.items()},
        limits=_parse_limits(raw.get("limits") or {}),
        mode=mode,
        readiness_timeout_seconds=float(timeout),
        user=user,
    )


_USER_RE = re.compile(r"^(\d{1,10})(?::(\d{1,10}))?$")


def _parse_user(value: Any) -> str | None:
    """None, "root", or a numeric `uid[:gid]` (as text); a user name is an error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("user must be null, root, or a numeric uid or uid:gid")
    text = str(value).strip()
    if text == "root":
        return text
    match = _USER_RE.match(text)
    if not match or any(int(part) > MAX_ID for part in match.groups() if part is not None):
        raise ValueError(
            f"user must be null (a uid of its own), root, or a numeric uid or uid:gid, got {text!r}: "
            "gpud must know the host uid to give the worker its directories, so names are not accepted"
        )
    return text


def _parse_limits(raw: Any) -> Limits:
    if not isinstance(raw, dict):
        raise ValueError("limits must be a mapping")
    unknown = set(raw) - _LIMIT_KEYS
    if unknown:
        raise ValueError(f"unknown limit(s): {', '.join(sorted(map(str, unknown)))}")
    base = Limits()
    cpus = raw.get("cpus", base.cpus)
    if isinstance(cpus, bool) or not isinstance(cpus, int | float) or cpus <= 0:
        raise ValueError("limits.cpus must be a positive number")
    pids = raw.get("pids", base.pids)
    if isinstance(pids, bool) or not isinstance(pids, int) or pids <= 0:
        raise ValueError("limits.pids must be a positive integer")
    return Limits(
        memory_bytes=parse_size(raw.get("memory", base.memory_bytes)),
        cpus=float(cpus),
        pids=pids,
        shm_bytes=parse_size(raw.get("shm_size", base.shm_bytes)),
        tmpfs_bytes=parse_size(raw.get("tmpfs_size", base.tmpfs_bytes)),
    )
