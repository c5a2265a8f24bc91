"""`import pynvml` inside a gpud child process under test: FakeNvml's calls as this module's attributes.

A test puts this directory first on the child's PYTHONPATH (shadowing nvidia-ml-py) and steers the "hardware"
through a control file, one command per line, applied before each NVML call:

    xid GPU XID                    the driver reports an XID on GPU (FakeNvml.inject_xid)
    ecc GPU CORRECTED UNCORRECTED  volatile ECC counts (FakeNvml.set_ecc)
    throttle GPU BITS              clock event reason bits (hex or decimal)

GPUD_TEST_NVML_COUNT sets the number of GPUs (default 2); GPUD_TEST_NVML_CONTROL names the control file.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from tests.nvml_standin import FakeNvml

_fake = FakeNvml(count=int(os.environ.get("GPUD_TEST_NVML_COUNT", "2")))
_control = os.environ.get("GPUD_TEST_NVML_CONTROL", "")
_applied = 0  # control lines already applied
_lock = threading.Lock()


def _apply_control() -> None:
    """Apply the control file's new lines (a line without its newline yet is left for next time)."""
    global _applied
    if not _control:
        return
    with _lock:
        try:
            with open(_control) as file:
                text = file.read()
        except FileNotFoundError:
            return
        lines = text.split("\n")[:-1]  # complete lines only
        for line in lines[_applied:]:
            command, *args = line.split()
            if command == "xid":
                _fake.inject_xid(int(args[0]), int(args[1]))
            elif command == "ecc":
                _fake.set_ecc(int(args[0]), corrected=int(args[1]), uncorrected=int(args[2]))
            elif command == "throttle":
                _fake.throttle[int(args[0])] = int(args[1], 0)
        _applied = len(lines)


def __getattr__(name: str) -> Any:
    attr = getattr(_fake, name)
    if not (name.startswith("nvml") and callable(attr)):
        return attr

    def call(*args: Any, **kwargs: Any) -> Any:
        _apply_control()
        return attr(*args, **kwargs)

    return call
