"""This gpud's instance id: random, made once, kept in the state directory, stamped on every container it makes.

Several gpud instances may share one engine (tests do; a host could): each finds and touches only the
containers carrying its own id.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

INSTANCE_FILE = "instance-id"
_VALID = re.compile(r"^[0-9a-f]{16,64}$")


def instance_id(state_dir: Path) -> str:
    """The id in `<state_dir>/instance-id`, created (0600) on first use; a damaged file is replaced, with a
    warning, since containers labelled with an id nobody can read are unreachable anyway."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / INSTANCE_FILE
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        text = None
    if text is not None and _VALID.match(text):
        return text
    if text is not None:
        logger.warning("%s holds no valid instance id (%.40r); making a new one", path, text)
    new = secrets.token_hex(8)
    tmp = path.with_name(f".{INSTANCE_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(new + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    logger.info("instance id %s (new; kept in %s)", new, path)
    return new
