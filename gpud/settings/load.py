"""Loading settings: one typed, frozen object resolved from defaults < YAML file < environment < flags.

What each setting is comes from its declaration in gpud.settings.schema. Secrets may also be read from a file
named by `<ENV>_FILE` (e.g. `INTERNAL_API_KEY_FILE`), so they need not sit in the environment. Problems are
collected, not raised one by one: `ConfigError.problems` names each key and the place its value came from.
"""

from __future__ import annotations

import difflib
import grp
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gpud.errors import ConfigError
from gpud.settings import parsers
from gpud.settings.schema import SPECS, Settings

DEFAULT_CONFIG_FILE = Path("/etc/gpud/gpud.yaml")
PACKAGED_DEFAULTS = Path(__file__).with_name("defaults")


def dev_defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    """The embedded configuration of `gpud run --dev`: two static GPUs, a user socket, the example presets."""
    runtime_dir = Path(environ.get("XDG_RUNTIME_DIR") or f"/tmp/gpud-{os.getuid()}")
    state_dir = dev_state_dir(environ)
    return {
        "gpu_backend": "static",
        "gpu_device_ids": "0,1",
        "gpu_device_difficulty": "0:low,1:high",
        "admin_socket": str(runtime_dir / "gpud" / "gpud.sock"),
        "state_dir": str(state_dir),
        "model_cache_dir": str(state_dir / "models"),
        "presets_file": str(PACKAGED_DEFAULTS / "models.yaml"),
        "auto_fetch_models": "false",
        "internal_api_key": "dev-key",
        "allowed_docker_images": "localhost/gpud-worker-python:*,gpud-worker-python:*",
    }


def dev_state_dir(environ: Mapping[str, str]) -> Path:
    """`--dev`'s state: $XDG_STATE_HOME/gpud, else ~/.local/state/gpud; for root /var/lib/gpud-dev, because the
    process runtime runs each worker as a uid of its own, which must reach the sockets, SDK and models in there,
    and root's home (0700) lets no one else in."""
    if environ.get("XDG_STATE_HOME"):
        return Path(environ["XDG_STATE_HOME"]) / "gpud"
    if os.geteuid() == 0:
        return Path("/var/lib/gpud-dev")
    return Path.home() / ".local" / "state" / "gpud"


def load(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    dev: bool = False,
) -> Settings:
    """Resolve settings from every layer and validate them; raise ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    raw: dict[str, tuple[Any, str]] = {}
    if dev:
        raw.update({k: (v, "--dev defaults") for k, v in dev_defaults(environ).items()})
    path, explicit = _config_path(config_file, environ)
    if path is not None:
        raw.update(_read_yaml(path, explicit, problems))
    raw.update(_read_environ(environ, problems))
    raw.update({k: (v, f"flag --{k.replace('_', '-')}") for k, v in (flags or {}).items() if v is not None})
    values: dict[str, Any] = {}
    failed: set[str] = set()
    for name, (value, source) in raw.items():
        try:
            values[name] = SPECS[name].parse(value)
        except (ValueError, TypeError) as exc:
            problems.append(f"{source}: {name}: {exc}")
            failed.add(name)
    settings = Settings(**values, config_file=path if path is not None and path.exists() else None)
    # Cross-checks run even when some values failed, so one run reports every problem; they skip failed fields.
    problems.extend(_check(settings, failed))
    if problems:
        raise ConfigError(problems)
    return settings


def _config_path(config_file: Path | None, environ: Mapping[str, str]) -> tuple[Path | None, bool]:
    """The YAML file to read and whether it was named explicitly (then it must exist)."""
    if config_file is not None:
        return config_file, True
    if environ.get("GPUD_CONFIG"):
        return Path(environ["GPUD_CONFIG"]), True
    return DEFAULT_CONFIG_FILE, False


def _read_yaml(path: Path, explicit: bool, problems: list[str]) -> dict[str, tuple[Any, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            problems.append(f"{path}: config file not found")
        return {}
    except OSError as exc:
        problems.append(f"{path}: cannot read config file: {exc.strerror or exc}")
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problems.append(f"{path}: not valid YAML: {exc}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping of setting names to values")
        return {}
    found: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        if key not in SPECS:
            hint = suggest(str(key))
            problems.append(f"{path}: {key}: unknown key" + (f" (did you mean {hint}?)" if hint else ""))
            continue
        found[key] = (value, str(path))
    return found


def _read_environ(environ: Mapping[str, str], problems: list[str]) -> dict[str, tuple[Any, str]]:
    found: dict[str, tuple[Any, str]] = {}
    for name, spec in SPECS.items():
        for env_name in spec.env:
            if env_name in environ:
                found[name] = (environ[env_name], f"env {env_name}")
            elif spec.secret and f"{env_name}_FILE" in environ:
                file_var = f"{env_name}_FILE"
                try:
                    found[name] = (parsers.read_secret_file(Path(environ[file_var])), f"env {file_var}")
                except OSError as exc:
                    problems.append(f"env {file_var}: {name}: cannot read {environ[file_var]}: {exc.strerror}")
    return found


def _check(settings: Settings, failed: set[str]) -> list[str]:
    """Problems that involve more than one setting (fields that failed to parse are left out)."""
    where = str(settings.config_file) if settings.config_file else "settings"
    problems = []
    known = set(settings.gpu_device_ids)
    if settings.gpu_backend == "static" and not known and "gpu_device_ids" not in failed:
        problems.append(f"{where}: gpu_device_ids: the static GPU backend needs GPU_DEVICE_IDS (e.g. 0,1)")
    if known:
        for gpu_id in sorted(set(settings.gpu_device_difficulty) - known):
            problems.append(
                f"{where}: gpu_device_difficulty: GPU {gpu_id} is not in GPU_DEVICE_IDS "
                f"({','.join(map(str, sorted(known)))})"
            )
    timeouts_parsed = not {"default_task_timeout", "max_task_timeout"} & failed
    if timeouts_parsed and settings.default_task_timeout > settings.max_task_timeout:
        problems.append(
            f"{where}: default_task_timeout: {settings.default_task_timeout:g} is more than "
            f"max_task_timeout {settings.max_task_timeout:g}"
        )
    # Worker sockets live at <state_dir>/sessions/<16 hex>/worker.sock; AF_UNIX paths stop at 107 bytes.
    if len(str(settings.state_dir)) + len("/sessions/0123456789abcdef/worker.sock") > 107:
        problems.append(f"{where}: state_dir: {settings.state_dir} is too long for worker socket paths")
    if settings.admin_socket_group is not None:
        try:
            grp.getgrnam(settings.admin_socket_group)
        except KeyError:
            problems.append(f"{where}: admin_socket_group: no group named {settings.admin_socket_group!r}")
    return problems


def suggest(key: str) -> str | None:
    """The known key closest to a mistyped one (an environment name used as a YAML key included), if any."""
    lowered = key.lower()
    by_env = {env.lower(): name for name, spec in SPECS.items() for env in spec.env}
    if lowered in by_env:
        return by_env[lowered]
    matches = difflib.get_close_matches(lowered, list(SPECS), n=1)
    return matches[0] if matches else None
