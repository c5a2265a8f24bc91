"""gpud's example workers and demo model, made usable where the daemon runs them (`gpud run --dev` works as is).

- The packaged presets (gpud/settings/defaults/models.yaml) run the example workers at /opt/gpud/examples, where
  the stock worker image (examples/images/worker) has them. The process runtime has no image: gpud keeps a
  world-readable copy in GPUD_STATE_DIR/examples (each worker runs as a uid of its own) and the runtime maps
  /opt/gpud/examples there, so the same presets work on every runtime.
- `--dev` fetches no models, so it places the demo model (examples/models/demo-text) in its cache when missing.

The examples come from the source checkout (an editable install), else from the data files a wheel installs
under <prefix>/share/gpud/examples (setup.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
from pathlib import Path

from gpud.modelstore.disk import TMP_PREFIX, remove_tree

logger = logging.getLogger(__name__)

IMAGE_EXAMPLES_DIR = "/opt/gpud/examples"  # where the stock worker image has them (examples/images/worker)
DEMO_MODEL = "demo-text"


def examples_source() -> Path | None:
    """Where gpud's examples are: the checkout this module runs from, else the installed data files."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "examples",
        Path(sys.prefix) / "share" / "gpud" / "examples",
    ):
        if (candidate / "workers").is_dir():
            return candidate
    return None


def install_example_workers(target: Path, source: Path | None = None) -> bool:
    """Copy the example workers into `target` (0755, files 0644: any worker uid reads them); False if gpud was
    installed without its examples. Replaced file by file, atomically, like the SDK copy."""
    source = source or examples_source()
    if source is None:
        logger.warning("the example workers are not installed; presets naming %s will not run", IMAGE_EXAMPLES_DIR)
        return False
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o755)
    for worker in sorted((source / "workers").glob("*.py")):
        tmp = target / f".{worker.name}.tmp"
        shutil.copyfile(worker, tmp)
        tmp.chmod(0o644)
        tmp.replace(target / worker.name)
    return True


def seed_demo_model(cache_dir: Path, source: Path | None = None) -> bool:
    """Place the demo model in the cache unless a model of that name is there; True when it was placed.

    Copied under a temporary name and renamed, so a crash leaves only a temporary the store deletes at start."""
    target = cache_dir / DEMO_MODEL
    if target.exists():
        return False
    source = source or examples_source()
    model = source / "models" / DEMO_MODEL if source is not None else None
    if model is None or not model.is_dir():
        logger.warning("--dev: the demo model %s is not installed; place it in %s by hand", DEMO_MODEL, cache_dir)
        return False
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"{TMP_PREFIX}{DEMO_MODEL}-{os.getpid()}"
    remove_tree(tmp)
    shutil.copytree(model, tmp, ignore=shutil.ignore_patterns("__pycache__"))
    _world_readable(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another gpud placed it meanwhile: theirs is as good
        remove_tree(tmp)
        return False
    logger.info("--dev: placed the demo model %s in %s", DEMO_MODEL, target)
    return True


def _world_readable(root: Path) -> None:
    """Directories 0755 and files 0644 below `root`: workers run as other uids and only read models."""
    root.chmod(0o755)
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(directory, name), 0o755, follow_symlinks=False)
        for name in files:
            path = os.path.join(directory, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.chmod(path, 0o644)


def closed_to_others(path: Path) -> Path | None:
    """The first directory on the way to `path` that other users cannot enter (no o+x), or None."""
    current = Path(path.anchor)
    for part in path.parts[1:]:
        current = current / part
        try:
            mode = current.stat().st_mode
        except OSError:
            return None  # not there yet: gpud creates it with a traversable mode
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return current
    return None


def process_image_dirs(state_dir: Path) -> dict[str, str]:
    """The image directories the process runtime stands in for, as host directories (see the module doc)."""
    return {IMAGE_EXAMPLES_DIR: str(state_dir / "examples")}


def prepare_process_host(state_dir: Path, model_cache_dir: Path) -> None:
    """For the process runtime: install the example workers, and warn when workers (other uids, if gpud is root)
    could not reach the state directory or the model cache."""
    install_example_workers(state_dir / "examples")
    if os.geteuid() != 0:
        return  # workers run as gpud's own user, which reaches what gpud does
    for what, path in (("GPUD_STATE_DIR", state_dir), ("MODEL_CACHE_DIR", model_cache_dir)):
        closed = closed_to_others(path)
        if closed is not None:
            logger.warning(
                "process runtime: workers run as uids of their own but cannot enter %s (mode %s), so they cannot "
                "reach %s %s; choose a %s other users may traverse",
                closed, oct(closed.stat().st_mode & 0o777), what, path, what,
            )  # fmt: skip
