"""A hostile session worker: speaks the worker protocol by hand (stdlib only, no SDK) and, per task, sends what
the task's metadata `attack` names. Used by tests/security to reproduce the review's findings 3 and 4.

Attacks: big_logs (`count` log messages of `size` bytes), small_deltas (`count` deltas of `size` bytes),
big_deltas (`count` deltas of `size` bytes), hostile_values (NaN/Infinity/1e400 progress, extra progress fields,
lone surrogates in text, a deeply nested message, an error whose message and code hold newlines; with `hang`, no
error and no done: the task runs until cancelled), deep_then_close
(a deeply nested message, then the connection closed while the process lives on). Anything else: a short text.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any


def connect() -> socket.socket:
    """Connect to gpud's socket, retrying while it is not there yet."""
    path = os.environ["GPUD_WORKER_SOCKET"]
    deadline = time.monotonic() + 30
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def line(message: dict[str, Any]) -> bytes:
    """One well-formed protocol line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def repeat(sock: socket.socket, one: bytes, count: int) -> None:
    """Send `one` `count` times, in large writes."""
    per_write = max(1, (1 << 20) // len(one))
    while count > 0:
        n = min(per_write, count)
        sock.sendall(one * n)
        count -= n


def hostile_values(sock: socket.socket, task_id: str, hang: bool) -> None:
    """Values Python's json writes but JSON forbids, text gpud cannot encode as is, and log-forging text."""
    t = json.dumps(task_id)
    raw = [
        b'{"type":"progress","task_id":%s,"done":NaN,"total":Infinity}' % t.encode(),
        b'{"type":"progress","task_id":%s,"done":1,"total":1e400}' % t.encode(),
        b'{"type":"text_delta","task_id":%s,"delta":"lone \\ud800 surrogate "}' % t.encode(),
        b'{"type":"log","task_id":%s,"stream":"std\\nerr","line":"log \\udfff line"}' % t.encode(),
        b'{"type":"log","task_id":%s,"line":' % t.encode() + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"type":"pong","id":[1,2]}',
    ]
    sock.sendall(b"\n".join(raw) + b"\n")
    sock.sendall(
        line(
            {"type": "progress", "task_id": task_id, "done": 2, "total": -5, "evil": {"x": "y"}, "message": "half\nway"}
        )
    )
    sock.sendall(line({"type": "result", "task_id": task_id, "note": "\ud800"}))  # json.dumps escapes it: \ud800
    if hang:  # no error, no done: the task stays running until cancelled
        return
    forged = "2030-01-01 00:00:00,000 ERROR gpud.forged: FORGED LINE"
    sock.sendall(line({"type": "error", "task_id": task_id, "code": "Boom\nX", "message": f"failed\n{forged}\r"}))
    sock.sendall(line({"type": "done", "task_id": task_id, "status": "failed"}))


def run(sock: socket.socket, task_id: str, data: dict[str, Any]) -> bool:
    """Carry out one task's attack; False when the worker should stop reading."""
    attack = data.get("attack")
    count, size = int(data.get("count", 1)), int(data.get("size", 1))
    if attack == "big_logs":
        repeat(sock, line({"type": "log", "task_id": task_id, "stream": "stderr", "line": "L" * size}), count)
    elif attack in ("small_deltas", "big_deltas"):
        repeat(sock, line({"type": "text_delta", "task_id": task_id, "delta": "d" * size}), count)
    elif attack == "hostile_values":
        hostile_values(sock, task_id, bool(data.get("hang")))
        return True
    elif attack == "deep_then_close":
        sock.sendall(b'{"type":"log","task_id":"%s","line":' % task_id.encode() + b"[" * 200_000 + b"\n")
        sock.shutdown(socket.SHUT_RDWR)  # close() alone would keep the connection: main()'s reader holds the fd
        sock.close()
        time.sleep(60)  # the process lives on: only the connection tells gpud
        return False
    else:
        sock.sendall(line({"type": "text_delta", "task_id": task_id, "delta": "ok"}))
    sock.sendall(line({"type": "done", "task_id": task_id, "status": "completed"}))
    return True


def main() -> int:
    """hello, ready, then one task at a time until shutdown."""
    sock = connect()
    sock.sendall(line({"type": "hello", "protocol": 1, "pid": os.getpid(), "sdk": "hostile/1"}))
    sock.sendall(line({"type": "ready", "info": {}}))
    for raw in sock.makefile("rb"):
        message = json.loads(raw)
        kind = message.get("type")
        if kind == "ping":
            sock.sendall(line({"type": "pong", "id": message.get("id")}))
        elif kind == "cancel":
            sock.sendall(line({"type": "done", "task_id": message.get("task_id"), "status": "cancelled"}))
        elif kind == "task":
            if not run(sock, message["task_id"], message.get("input") or {}):
                return 0
        elif kind == "shutdown":
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
