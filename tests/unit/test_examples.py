"""gpud's examples where the daemon needs them: the demo model seeded for --dev, the example workers copied for the
process runtime (readable by any worker uid), and the check that workers can reach gpud's directories."""

from __future__ import annotations

import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from gpud.daemon.examples import (
    DEMO_MODEL,
    IMAGE_EXAMPLES_DIR,
    closed_to_others,
    examples_source,
    install_example_workers,
    process_image_dirs,
    seed_demo_model,
)

REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_checkout_is_found_first() -> None:
    assert examples_source() == REPO / "examples"


def test_seed_places_the_demo_model_once(tmp_path: Path) -> None:
    cache = tmp_path / "models"
    assert seed_demo_model(cache) is True
    model = cache / DEMO_MODEL
    assert (model / "tokens.txt").read_bytes() == (REPO / "examples/models/demo-text/tokens.txt").read_bytes()
    assert mode(model) == 0o755 and mode(model / "tokens.txt") == 0o644
    assert [p.name for p in cache.iterdir()] == [DEMO_MODEL]  # no temporary left
    (model / "tokens.txt").write_text("changed by the operator\n")
    assert seed_demo_model(cache) is False
    assert (model / "tokens.txt").read_text() == "changed by the operator\n"


def test_seed_without_installed_examples_leaves_the_cache_alone(tmp_path: Path) -> None:
    assert seed_demo_model(tmp_path / "models", source=tmp_path / "nothing") is False
    assert not (tmp_path / "models" / DEMO_MODEL).exists()


def test_seed_cleans_up_when_another_gpud_was_faster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    theirs = cache / DEMO_MODEL
    theirs.mkdir(parents=True)
    (theirs / "tokens.txt").write_text("theirs\n")
    real_exists = Path.exists
    # The other gpud's copy appears between the check and the rename.
    monkeypatch.setattr(Path, "exists", lambda self, **kw: False if self == theirs else real_exists(self, **kw))
    assert seed_demo_model(cache) is False
    assert [p.name for p in cache.iterdir()] == [DEMO_MODEL]  # our temporary copy is gone
    assert (theirs / "tokens.txt").read_text() == "theirs\n"


def test_example_workers_are_copied_world_readable(tmp_path: Path) -> None:
    target = tmp_path / "state" / "examples"
    assert install_example_workers(target) is True
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted(p.name for p in (REPO / "examples" / "workers").glob("*.py"))
    assert mode(target) == 0o755 and all(mode(target / name) == 0o644 for name in names)
    (target / "stream_text.py").write_text("stale")
    install_example_workers(target)  # every start refreshes the copy
    assert (target / "stream_text.py").read_text() == (REPO / "examples/workers/stream_text.py").read_text()
    assert process_image_dirs(tmp_path / "state") == {IMAGE_EXAMPLES_DIR: str(target)}


def test_a_directory_others_cannot_enter_is_found() -> None:
    base = Path(tempfile.mkdtemp(prefix="gex-", dir="/tmp"))
    try:
        base.chmod(0o755)
        inner = base / "user" / "state"
        inner.mkdir(parents=True)
        (base / "user").chmod(0o700)  # like a Debian 12 home directory
        assert closed_to_others(inner) == base / "user"
        (base / "user").chmod(0o711)
        assert closed_to_others(inner) is None
        assert closed_to_others(inner / "not" / "made" / "yet") is None  # gpud creates those traversable
    finally:
        shutil.rmtree(base, ignore_errors=True)
