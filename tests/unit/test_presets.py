"""Model presets: the original file shape works as is; problems name the model and preset."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpud.errors import ConfigError, NotFound
from gpud.settings.presets import load_presets, parse_size

REPO = Path(__file__).resolve().parents[2]


def test_original_form_loads_with_defaults_for_new_fields(presets_file: Path) -> None:
    catalog = load_presets(presets_file)
    preset = catalog.get("llama-7b", "inference")
    assert preset.image == "llm-runner:latest"
    assert preset.command == ("python", "inference.py")
    assert preset.env == {"MODEL_NAME": "llama-7b"}
    assert preset.mode == "any" and preset.user is None
    assert preset.limits.memory_bytes == 16 * 1024**3  # the original design's --memory=16g


def test_packaged_example_presets_are_valid() -> None:
    catalog = load_presets(REPO / "gpud" / "settings" / "defaults" / "models.yaml")
    assert {p.key for p in catalog.all()} >= {"demo-text/stream", "demo-text/oneoff"}


def test_unknown_model_and_preset_are_not_found(presets_file: Path) -> None:
    catalog = load_presets(presets_file)
    with pytest.raises(NotFound) as info:
        catalog.get("nope", "inference")
    assert info.value.code == "model_not_found"
    with pytest.raises(NotFound) as info:
        catalog.get("llama-7b", "nope")
    assert info.value.code == "preset_not_found"


def test_problems_name_model_and_preset(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        "  a:\n    p: {command: [x]}\n"
        "  b:\n    q: {docker_image: img, limits: {memory: lots}}\n"
        "  c:\n    r: {docker_image: img, colour: red}\n"
        "  ../evil:\n    s: {docker_image: img}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_presets(path)
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4
    assert "models.a.p: docker_image is required" in text
    assert "models.b.q: not a size" in text
    assert "models.c.r: unknown key(s): colour" in text
    assert "models.../evil" in text


def test_user_is_null_root_or_numeric_never_a_name(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    good = {"none": "null", "root": "root", "zero": "0", "uid": "1234", "both": "'1234:99'", "int": "4321"}
    path.write_text(
        "models:\n  m:\n" + "".join(f"    {name}: {{docker_image: img, user: {user}}}\n" for name, user in good.items())
    )
    users = {p.name: p.user for p in load_presets(path).all()}
    assert users == {"none": None, "root": "root", "zero": "0", "uid": "1234", "both": "1234:99", "int": "4321"}
    bad = {"name": "nobody", "group": "'1000:staff'", "neg": "-1", "big": "4294967295", "flag": "true"}
    path.write_text(
        "models:\n  m:\n" + "".join(f"    {name}: {{docker_image: img, user: {user}}}\n" for name, user in bad.items())
    )
    with pytest.raises(ConfigError) as info:
        load_presets(path)
    assert len(info.value.problems) == len(bad)
    assert all("numeric uid" in problem for problem in info.value.problems)
    assert "names are not accepted" in info.value.problems[0]


def test_not_yaml_and_wrong_shape(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_presets(path)
    path.write_text("presets: {}\n")
    with pytest.raises(ConfigError, match="one key 'models'"):
        load_presets(path)


@pytest.mark.parametrize(("text", "size"), [("16g", 16 * 1024**3), ("512m", 512 * 1024**2), ("100", 100), (4096, 4096)])
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["-1g", "0", "lots", True, "1.5g"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_etc_presets_match_the_packaged_defaults() -> None:
    # etc/gpud/models.yaml is what operators copy; the package carries the same file for `gpud run --dev`.
    shipped = (REPO / "etc" / "gpud" / "models.yaml").read_text()
    assert shipped == (REPO / "gpud" / "settings" / "defaults" / "models.yaml").read_text()
