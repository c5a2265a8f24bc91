"""The settings' single declarations and what is derived from them: loading, reload, the README table."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from gpud.errors import ConfigError
from gpud.settings import RELOADABLE, SPECS, Settings, load
from gpud.settings.reference import TABLE_BEGIN, TABLE_END, block, markdown_table

REPO = Path(__file__).resolve().parents[2]
ORIGINAL_NAMES = {
    "GPU_DEVICE_IDS",
    "GPU_DEVICE_DIFFICULTY",
    "SESSION_IDLE_TIMEOUT_SECONDS",
    "SESSION_MAX_LIFETIME_SECONDS",
    "SESSION_QUEUE_MAX_SIZE",
    "FILE_SERVICE_URL",
    "FILE_SERVICE_INTERNAL_KEY",
    "INTERNAL_API_KEY",
    "AUTO_FETCH_MODELS",
    "MODEL_CACHE_DIR",
    "ALLOWED_DOCKER_IMAGES",
    "DEFAULT_TASK_TIMEOUT",
    "MAX_TASK_TIMEOUT",
    "GPU_METRICS_REFRESH_INTERVAL",
}


def test_every_field_is_a_declared_setting() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)} - {"config_file"}
    assert fields == set(SPECS)
    for name, spec in SPECS.items():
        assert spec.help and spec.env, name
    env_names = [env for spec in SPECS.values() for env in spec.env]
    assert len(env_names) == len(set(env_names))


def test_the_original_names_are_declared() -> None:
    declared = {env for spec in SPECS.values() for env in spec.env}
    assert declared >= ORIGINAL_NAMES


def test_reloadable_is_derived_from_the_declarations() -> None:
    assert {name for name, spec in SPECS.items() if spec.reloadable} == RELOADABLE
    # Settings bound at start (sockets, paths, the engine) cannot change live.
    assert not {"http_listen", "admin_socket", "runtime", "state_dir", "model_cache_dir"} & RELOADABLE


def test_readme_holds_the_generated_table() -> None:
    readme = (REPO / "README.md").read_text()
    assert TABLE_BEGIN in readme and TABLE_END in readme
    shown = readme[readme.index(TABLE_BEGIN) : readme.index(TABLE_END) + len(TABLE_END)]
    assert shown == block(), "README settings table differs from the declarations: run `gpud settings --markdown`"


def test_table_has_a_row_per_setting() -> None:
    rows = markdown_table().splitlines()[2:]
    assert len(rows) == len(SPECS)
    assert all(f"| {name} |" in row for name, row in zip(SPECS, rows, strict=True))


def test_settings_command_prints_the_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpud", "settings", "--markdown"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == markdown_table()


@pytest.mark.parametrize(
    "value",
    ["img@sha256:nothex", "a:1, b@sha256:" + "0" * 63, "c@md5:" + "0" * 32],
)
def test_a_malformed_allowlist_is_refused_at_load(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(None, environ={"ALLOWED_DOCKER_IMAGES": value})
    [problem] = raised.value.problems
    assert problem.startswith("env ALLOWED_DOCKER_IMAGES: allowed_docker_images:") and "sha256" in problem


def test_check_config_refuses_a_malformed_allowlist() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpud", "check-config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "ALLOWED_DOCKER_IMAGES": "img@sha256:nothex"},
    )
    assert result.returncode == 2 and "ALLOWED_DOCKER_IMAGES" in result.stderr, result.stderr


def test_allowlist_from_yaml_list_and_pins(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    path = tmp_path / "gpud.yaml"
    path.write_text(f'allowed_docker_images: ["runner:*", "pinned@{digest}"]\n')
    policy = load(path, environ={}).allowed_docker_images
    assert policy.allows("runner:2") and policy.allows(f"pinned@{digest}")
    assert not policy.allows("pinned:latest") and not policy.allows("other:1")
