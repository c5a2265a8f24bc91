"""Installing the worker SDK where session containers mount it (read-only) from."""

from __future__ import annotations

import shutil
from pathlib import Path

from gpud.worker import sdk_source_path
from gpud.worker.protocol import CONTAINER_SDK_PATH


def install_sdk(sdk_dir: Path, source: Path | None = None) -> None:
    """Copy the stdlib-only SDK to `sdk_dir/gpud_worker.py`, readable by any worker user (mounted read-only)."""
    source = source or sdk_source_path()
    sdk_dir.mkdir(parents=True, exist_ok=True)
    sdk_dir.chmod(0o755)
    target = sdk_dir / Path(CONTAINER_SDK_PATH).name
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.chmod(0o644)
    tmp.replace(target)  # atomic: a worker starting now sees the old file or the new one, never half
