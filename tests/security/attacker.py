"""A local unprivileged attacker: Python code run as another host uid (nobody by default), and what it tries.

The code runs in a fresh interpreter started through `setpriv --reuid --regid --clear-groups`, so it has that uid
and gid from its first instruction, no supplementary groups and no capabilities: what a local user, or a worker
that reached the host, would be. Each attempt answers with one word: `allowed`, `EACCES`, `ENOENT`, `closed`
(connected, then gpud hung up), `hijacked:<input>` (gpud handed it a task), or an exception name.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

NOBODY = 65534

_PRELUDE = r'''
import json, os, socket, sys, time

def attempt(kind, path):
    try:
        if kind == "list":
            os.listdir(path)
        elif kind == "enter":
            os.chdir(path)
        elif kind == "read":
            open(path, "rb").read()
        elif kind == "connect":
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect(path)
            s.close()
        return "allowed"
    except PermissionError:
        return "EACCES"
    except FileNotFoundError:
        return "ENOENT"
    except OSError as exc:
        return type(exc).__name__

def line(message):
    return json.dumps(message).encode() + b"\n"

def hijack_once(path):
    """Play the session's worker: connect, say ready, and answer the first task with chosen output."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(path)
        s.sendall(line({"type": "hello", "protocol": 1, "pid": os.getpid()}) + line({"type": "ready", "info": {}}))
        data = s.recv(65536)
    except PermissionError:
        return "EACCES"
    except FileNotFoundError:
        return "ENOENT"
    except OSError:
        return "closed"
    if not data:
        return "closed"
    message = json.loads(data.split(b"\n")[0])
    if message.get("type") != "task":
        return "other:" + str(message.get("type"))
    task_id = message["task_id"]
    s.sendall(line({"type": "text_delta", "task_id": task_id, "delta": "PWNED"})
              + line({"type": "done", "task_id": task_id, "status": "completed"}))
    return "hijacked:" + json.dumps(message.get("input"))
'''


async def run_as(uid: int, code: str, timeout: float = 60.0) -> Any:
    """Run `code` (after the prelude above) as uid:uid with no groups; return the JSON it prints last."""
    proc = await asyncio.create_subprocess_exec(
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        sys.executable,
        "-S",
        "-c",
        _PRELUDE + code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, f"attacker code failed ({proc.returncode}): {err.decode()}"
    return json.loads(out.decode().strip().splitlines()[-1])


async def attempts(uid: int, tries: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Each named (kind, path) attempt, made as uid: kind is list, enter, read or connect."""
    return dict(await run_as(uid, f"print(json.dumps({{k: attempt(*v) for k, v in {tries!r}.items()}}))"))


async def hijack(uid: int, socket_path: str, seconds: float) -> list[str]:
    """Try to take a session's worker place over and over for `seconds` (or until it works); every outcome."""
    code = (
        "results = []\n"
        f"end = time.monotonic() + {seconds!r}\n"
        "while time.monotonic() < end:\n"
        f"    results.append(hijack_once({socket_path!r}))\n"
        "    if results[-1].startswith('hijacked'):\n"
        "        break\n"
        "    time.sleep(0.05)  # pacing between tries, not ordering\n"
        "print(json.dumps(results))\n"
    )
    return list(await run_as(uid, code, timeout=seconds + 60))
