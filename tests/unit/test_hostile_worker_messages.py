"""A hostile worker's messages (security review, finding 4): decode failures of any kind are protocol errors, a
closed connection reaches the running task at once, progress and error fields are reduced to what is safe, long
container lines come in pieces, and gpud's log lines cannot be forged."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
from pathlib import Path

import pytest

from gpud.daemon.logs import JournalFormatter, SafeFormatter, escape_controls
from gpud.runtime.base import Stream
from gpud.runtime.logsplit import LineSplitter
from gpud.work.sessions.taskrun import progress_fields, worker_error
from gpud.worker.channel import WorkerChannel
from gpud.worker.messages import WorkerGone
from gpud.worker.protocol import ProtocolError, decode


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"progress","done":NaN}',
        b'{"type":"progress","done":-Infinity}',
        b'{"type":"progress","done":1e999}',
        b'{"type":"log","line":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"type":"x","n":' + b"1" * 5000 + b"}",
        b'{"type":"log","line":"\xff"}',
        b"[]",
    ],
    ids=["nan", "infinity", "1e999", "deep", "5000-digits", "bad-utf8", "not-object"],
)
def test_every_decode_failure_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(line)


def test_worker_strings_are_cleaned_not_refused() -> None:
    message = decode(b'{"type":"text_delta","delta":"a\\ud800b","\\udc01":"\xed\xa0\x80"}')
    assert message == {"type": "text_delta", "delta": "a\ufffdb", "\ufffd": "\ufffd"}
    json.dumps(message, allow_nan=False).encode()


def test_progress_keeps_only_finite_non_negative_counts() -> None:
    assert progress_fields({"done": 1.5, "total": 10, "evil": {"x": 1}, "task_id": "t"}) == {"done": 1.5, "total": 10}
    assert progress_fields({"done": -1, "total": True, "message": "a\nb\x1b[2J"}) == {
        "done": None,
        "total": None,
        "message": "a b [2J",
    }
    assert progress_fields({"done": 10**400, "message": "m" * 1000})["done"] is None


def test_error_code_and_message_are_capped_and_cleaned() -> None:
    error = worker_error({"code": "Bad\nCode" * 20, "message": "x\r\x1b" + "y" * 10_000})
    assert error.code == ("Bad_Code" * 20)[:64]
    assert error.message.startswith("x  yyy") and error.message.endswith("… [5907 more characters cut]")
    assert worker_error({"code": 5, "message": None}).code == "task_failed"


def own_channel(path: Path) -> WorkerChannel:
    return WorkerChannel(path, uid=os.geteuid(), gid=os.getegid())


async def connected(channel: WorkerChannel) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, str(channel.socket_path))
    hello = b'{"type":"hello","protocol":1,"pid":1}\n{"type":"ready","info":{}}\n'
    await asyncio.get_running_loop().sock_sendall(sock, hello)
    await channel.wait_ready(5)
    return sock


async def test_deep_message_then_close_reaches_the_running_task_at_once(tmp_path: Path) -> None:
    channel = own_channel(tmp_path / "sock")
    await channel.start()
    sock = await connected(channel)
    loop = asyncio.get_running_loop()
    try:
        events = channel.run_task("t", {})
        first = asyncio.ensure_future(anext(events))
        await loop.sock_recv(sock, 65536)  # the task message
        await loop.sock_sendall(sock, b'{"type":"log","task_id":"t","line":' + b"[" * 200_000 + b"\n")
        problem = await asyncio.wait_for(first, 5)
        assert problem.data["stream"] == "gpud" and "nested deeper" in problem.data["line"]
        sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(WorkerGone):
            await asyncio.wait_for(anext(events), 5)
    finally:
        sock.close()
        await channel.close()


async def test_a_flooding_worker_does_not_starve_the_event_loop(tmp_path: Path) -> None:
    channel = own_channel(tmp_path / "sock")
    await channel.start()
    sock = await connected(channel)
    loop = asyncio.get_running_loop()
    try:
        events = channel.run_task("t", {})
        first = asyncio.ensure_future(anext(events))
        await loop.sock_recv(sock, 65536)
        flood = b'{"type":"text_delta","task_id":"t","delta":"x"}\n' * 200_000
        sender = asyncio.ensure_future(loop.sock_sendall(sock, flood + b'{"type":"done","task_id":"t"}\n'))
        await first
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:  # other work on the loop: how long does it wait for a turn?
            while not done.is_set():
                started = loop.time()
                await asyncio.sleep(0)
                gaps.append(loop.time() - started)

        ticking = asyncio.ensure_future(ticker())
        count = 1
        while (await anext(events)).type != "done":
            count += 1
        done.set()
        await asyncio.gather(sender, ticking)
        assert count == 200_000
        assert max(gaps) < 0.5, f"the loop was held for {max(gaps):.2f}s"
    finally:
        sock.close()
        await channel.close()


def test_long_lines_come_in_pieces_cut_between_characters() -> None:
    splitter = LineSplitter(max_line=10)
    raw = ("é" * 12 + "\n").encode() + b"tail"
    lines = splitter.feed(Stream.STDOUT, raw) + splitter.flush()
    assert [(line.line, line.partial) for line in lines] == [
        ("é" * 5, True),
        ("é" * 5, True),
        ("é" * 2, False),
        ("tail", False),
    ]


def formatted(formatter: logging.Formatter, message: str, *args: object, exc: bool = False) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log = logging.getLogger("gpud.test.forging")
    log.handlers[:] = [handler]
    log.propagate = False
    try:
        if exc:
            try:
                raise ValueError("boom\n2030-01-01 00:00:00,000 ERROR gpud.x: FORGED")
            except ValueError:
                log.exception(message, *args)
        else:
            log.warning(message, *args)
    finally:
        log.handlers.clear()
    return stream.getvalue()


@pytest.mark.parametrize("journal", [False, True], ids=["terminal", "journald"])
def test_log_messages_cannot_start_a_new_line(journal: bool) -> None:
    formatter = JournalFormatter("%(name)s: %(message)s") if journal else SafeFormatter("%(levelname)s: %(message)s")
    out = formatted(formatter, "worker said %s", "ok\n2030-01-01 00:00:00,000 ERROR gpud.x: FORGED\r\x1b[2J\u2028")
    assert out.count("\n") == 1
    assert "ok\\n2030-01-01 00:00:00,000 ERROR gpud.x: FORGED\\r\\x1b[2J\\u2028" in out
    lines = formatted(formatter, "failed %s", "x\ny", exc=True).splitlines()
    assert "failed x\\ny" in lines[0]
    prefix = "<3>" if journal else ""
    assert all(line.startswith(prefix + "  ") for line in lines[1:]), lines
    assert escape_controls("tab\there") == "tab\\there"
