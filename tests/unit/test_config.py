"""Settings: precedence of defaults < YAML < environment < flags, the original names, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpud import settings as config
from gpud.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_when_nothing_is_given(tmp_path: Path) -> None:
    settings = config.load(None, environ={}, flags={})
    assert settings.http_listen == ("127.0.0.1", 8001)
    assert settings.admin_socket == Path("/run/gpud/gpud.sock")
    assert settings.session_queue_max_size == 5
    assert settings.session_idle_timeout_seconds == 300
    assert settings.runtime == "podman"
    assert settings.config_file is None  # /etc/gpud/gpud.yaml absent here: a missing default file is fine


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    yaml_file = write(
        tmp_path / "gpud.yaml",
        "session_queue_max_size: 3\nsession_idle_timeout_seconds: 100\nhttp_listen: 127.0.0.1:9000\nruntime: docker\n",
    )
    environ = {"SESSION_IDLE_TIMEOUT_SECONDS": "200", "GPUD_HTTP_LISTEN": "127.0.0.1:9100", "GPUD_RUNTIME": "docker"}
    settings = config.load(yaml_file, environ=environ, flags={"http_listen": "127.0.0.1:9200", "runtime": None})
    assert settings.session_queue_max_size == 3  # YAML over default
    assert settings.session_idle_timeout_seconds == 200  # env over YAML
    assert settings.http_listen == ("127.0.0.1", 9200)  # flag over env
    assert settings.runtime == "docker"  # a flag left unset (None) does not override
    assert settings.config_file == yaml_file


def test_original_design_names_work_as_environment_variables(tmp_path: Path) -> None:
    environ = {
        "GPU_DEVICE_IDS": "0,1",
        "GPU_DEVICE_DIFFICULTY": "0:low,1:high",
        "SESSION_IDLE_TIMEOUT_SECONDS": "300",
        "SESSION_MAX_LIFETIME_SECONDS": "3600",
        "SESSION_QUEUE_MAX_SIZE": "5",
        "FILE_SERVICE_URL": "http://127.0.0.1:8000/",
        "FILE_SERVICE_INTERNAL_KEY": "internal-secret",
        "INTERNAL_API_KEY": "k1,k2",
        "AUTO_FETCH_MODELS": "false",
        "MODEL_CACHE_DIR": str(tmp_path / "models"),
        "ALLOWED_DOCKER_IMAGES": "llm-runner:*, diffusion-runner:latest",
        "DEFAULT_TASK_TIMEOUT": "120",
        "MAX_TASK_TIMEOUT": "600",
        "GPU_METRICS_REFRESH_INTERVAL": "2.5",
    }
    s = config.load(None, environ=environ)
    assert s.gpu_device_ids == (0, 1)
    assert s.gpu_device_difficulty == {0: "low", 1: "high"}
    assert (s.session_idle_timeout_seconds, s.session_max_lifetime_seconds, s.session_queue_max_size) == (300, 3600, 5)
    assert s.file_service_url == "http://127.0.0.1:8000"
    assert s.file_service_internal_key == "internal-secret"
    assert s.internal_api_key == ("k1", "k2")
    assert s.auto_fetch_models is False
    assert s.model_cache_dir == tmp_path / "models"
    assert s.allowed_docker_images.patterns == ("llm-runner:*", "diffusion-runner:latest")
    assert (s.default_task_timeout, s.max_task_timeout, s.gpu_metrics_refresh_interval) == (120, 600, 2.5)


def test_secrets_can_come_from_files(tmp_path: Path) -> None:
    keys = write(tmp_path / "keys", "first-key\n\nsecond-key\n")
    internal = write(tmp_path / "internal", "s3cret\n")
    s = config.load(None, environ={"INTERNAL_API_KEY_FILE": str(keys), "FILE_SERVICE_INTERNAL_KEY_FILE": str(internal)})
    assert s.internal_api_key == ("first-key", "second-key")
    assert s.file_service_internal_key == "s3cret"
    assert "s3cret" not in repr(s)  # secrets are kept out of reprs and so out of logs


def test_gpud_config_env_names_the_file(tmp_path: Path) -> None:
    yaml_file = write(tmp_path / "other.yaml", "session_queue_max_size: 9\n")
    assert config.load(None, environ={"GPUD_CONFIG": str(yaml_file)}).session_queue_max_size == 9


def problems_of(tmp_path: Path, yaml_text: str = "", environ: dict[str, str] | None = None) -> list[str]:
    yaml_file = write(tmp_path / "gpud.yaml", yaml_text)
    with pytest.raises(ConfigError) as info:
        config.load(yaml_file, environ=environ or {})
    return info.value.problems


def test_unknown_yaml_key_is_an_error_naming_key_and_file(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, "session_queue_max_sise: 3\n")
    assert "session_queue_max_sise" in problem and str(tmp_path / "gpud.yaml") in problem
    assert "did you mean session_queue_max_size" in problem


def test_original_env_name_used_as_yaml_key_suggests_the_field(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, "SESSION_QUEUE_MAX_SIZE: 3\n")
    assert "did you mean session_queue_max_size" in problem


def test_bad_gpu_id_in_difficulty_map(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, "gpu_device_ids: [0, 1]\ngpu_device_difficulty: {0: low, 7: high}\n")
    assert "gpu_device_difficulty" in problem and "GPU 7" in problem


def test_negative_timeout_names_the_env_variable(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, environ={"DEFAULT_TASK_TIMEOUT": "-5"})
    assert problem.startswith("env DEFAULT_TASK_TIMEOUT: default_task_timeout:")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path, "nonsense: 1\nsession_queue_max_size: 0\n", environ={"GPU_DEVICE_DIFFICULTY": "0:medium"}
    )
    assert len(problems) == 3


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.yaml", environ={})


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("GPUD_HTTP_LISTEN", "[::1]:8001", ("::1", 8001)),
        ("GPUD_HTTP_LISTEN", ":8001", ("0.0.0.0", 8001)),
        ("AUTO_FETCH_MODELS", "yes", True),
        ("GPUD_MODEL_CACHE_MAX_BYTES", "200g", 200 * 1024**3),
    ],
)
def test_value_parsers(env: str, value: str, expected: object) -> None:
    settings = config.load(None, environ={env: value})
    field = {"GPUD_HTTP_LISTEN": "http_listen", "AUTO_FETCH_MODELS": "auto_fetch_models"}.get(
        env, "model_cache_max_bytes"
    )
    assert getattr(settings, field) == expected


def test_dev_defaults_are_lowest_precedence(tmp_path: Path) -> None:
    s = config.load(
        None, environ={"XDG_RUNTIME_DIR": str(tmp_path), "GPU_DEVICE_DIFFICULTY": "0:high,1:high"}, dev=True
    )
    assert s.gpu_backend == "static" and s.gpu_device_ids == (0, 1)
    assert s.gpu_device_difficulty == {0: "high", 1: "high"}
    assert s.admin_socket == tmp_path / "gpud" / "gpud.sock"


def run_check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpud", "check-config", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        cwd=REPO,
        timeout=60,
    )


def test_check_config_accepts_a_good_configuration(tmp_path: Path, presets_file: Path) -> None:
    yaml_file = write(tmp_path / "gpud.yaml", f"presets_file: {presets_file}\ngpu_device_ids: [0]\n")
    result = run_check_config("--config", str(yaml_file))
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout and "1 preset(s)" in result.stdout


def test_check_config_reports_one_line_per_problem(tmp_path: Path) -> None:
    yaml_file = write(tmp_path / "gpud.yaml", "bogus_key: 1\ngpu_device_ids: [0]\ngpu_device_difficulty: {3: low}\n")
    result = run_check_config("--config", str(yaml_file), env={"MAX_TASK_TIMEOUT": "-1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert any("bogus_key" in line and str(yaml_file) in line for line in lines)
    assert any("env MAX_TASK_TIMEOUT" in line for line in lines)
    assert any("GPU 3" in line for line in lines)


def test_check_config_catches_unreadable_presets_and_preset_without_image(tmp_path: Path) -> None:
    result = run_check_config(env={"GPUD_PRESETS_FILE": str(tmp_path / "nope.yaml")})
    assert result.returncode == 2 and "cannot read presets file" in result.stderr
    bad = write(tmp_path / "models.yaml", "models:\n  m1:\n    p1:\n      command: [x]\n")
    result = run_check_config(env={"GPUD_PRESETS_FILE": str(bad)})
    assert result.returncode == 2
    assert "models.m1.p1" in result.stderr and "docker_image is required" in result.stderr


def test_shipped_example_configuration_is_valid() -> None:
    environ = {"GPUD_PRESETS_FILE": str(REPO / "etc" / "gpud" / "models.yaml")}
    result = run_check_config("--config", str(REPO / "etc" / "gpud" / "gpud.yaml"), env=environ)
    assert result.returncode == 0, result.stderr


def test_dev_mode_allows_the_example_image() -> None:
    s = config.load(None, environ={}, dev=True)
    assert s.allowed_docker_images.allows("gpud-worker-python:latest")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/run/podman/podman.sock", "/run/podman/podman.sock"),
        ("unix:///run/podman/podman.sock", "/run/podman/podman.sock"),  # CONTAINER_HOST's form
        ("UNIX:///var/run/docker.sock", "/var/run/docker.sock"),  # DOCKER_HOST's, any case
        ("", None),  # the engine's default
    ],
)
def test_runtime_socket_takes_a_path_or_a_unix_url(value: str, expected: str | None) -> None:
    assert config.load(None, environ={"GPUD_RUNTIME_SOCKET": value}).runtime_socket == expected


@pytest.mark.parametrize(
    "value", ["tcp://127.0.0.1:2375", "ssh://host/run/podman.sock", "unix://relative.sock", "unix://", "x.sock"]
)
def test_runtime_socket_refuses_anything_but_a_local_unix_socket(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(None, environ={"GPUD_RUNTIME_SOCKET": value})
    assert err.value.problems == [
        f"env GPUD_RUNTIME_SOCKET: runtime_socket: expected a Unix socket: an absolute path (/run/podman/podman.sock)"
        f" or unix:///path, got {value!r} (gpud talks to the engine only over its local Unix socket)"
    ]


def test_dev_state_is_where_worker_uids_can_reach_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.load(None, environ={"XDG_STATE_HOME": str(tmp_path)}, dev=True).state_dir == tmp_path / "gpud"
    monkeypatch.setattr("os.geteuid", lambda: 0)
    s = config.load(None, environ={}, dev=True)
    assert s.state_dir == Path("/var/lib/gpud-dev")  # root's home (0700) would lock the workers' uids out
    assert s.model_cache_dir == Path("/var/lib/gpud-dev/models")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", "/home/dev")
    assert config.load(None, environ={}, dev=True).state_dir == Path("/home/dev/.local/state/gpud")
