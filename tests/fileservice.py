"""A small file service implementing the model download contract (docs/model-store.md), with failure knobs.

Use it in-process (`await FileService().start()`), or as a process for benchmarks:
    python tests/fileservice.py --file my-model=/path/to/weights.bin [--port 0] [--key K]
which prints `URL http://127.0.0.1:PORT` once it is listening and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import io
import signal
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web

SHA256_HEADER = "X-Content-SHA256"
CHUNK = 256 << 10


@dataclass
class Behaviour:
    """Knobs for one model's responses (or the default for all)."""

    status: int | None = None  # answer every request with this status (e.g. 404, 403, 500)
    fail_times: int = 0  # answer fail_status this many times, then serve normally
    fail_status: int = 503
    delay: float = 0.0  # seconds before the response starts
    chunk_delay: float = 0.0  # seconds between body chunks (slow service)
    chunk_size: int = CHUNK
    truncate_at: int | None = None  # drop the connection after this many body bytes
    corrupt: bool = False  # announce a wrong sha256
    send_sha: bool = True
    announce_length: int | None = None  # lie about Content-Length ("huge")
    send_length: bool = True  # False: chunked transfer encoding, no Content-Length


@dataclass
class Payload:
    """What a model id serves: a file on disk, or `zeros` bytes generated on the fly."""

    content_type: str
    path: Path | None = None
    zeros: int = 0
    filename: str | None = None
    sha256: str | None = None

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path is not None else self.zeros

    def digest(self) -> str:
        """sha256 of the body, computed once."""
        if self.sha256 is None:
            h = hashlib.sha256()
            for chunk in self.chunks(4 << 20):
                h.update(chunk)
            self.sha256 = h.hexdigest()
        return self.sha256

    def chunks(self, size: int):  # type: ignore[no-untyped-def]
        """The body in pieces of `size` bytes."""
        if self.path is None:
            block = bytes(size)
            left = self.zeros
            while left > 0:
                yield block[: min(size, left)]
                left -= size
            return
        with open(self.path, "rb") as f:
            while chunk := f.read(size):
                yield chunk


@dataclass
class FileService:
    """The test file service: payloads by model id, per-model behaviour knobs, and request counters."""

    key: str | None = "test-internal-key"
    key_header: str = "X-Internal-Key"
    default: Behaviour = field(default_factory=Behaviour)
    payloads: dict[str, Payload] = field(default_factory=dict)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    request_headers: list[Mapping[str, str]] = field(default_factory=list)  # every download request's, in order
    _runner: web.AppRunner | None = None
    url: str = ""

    # --- payloads -----------------------------------------------------------------------------

    def add_file(self, model_id: str, path: Path, *, filename: str | None = None,
                 content_type: str = "application/octet-stream") -> None:  # fmt: skip
        """Serve one file as the model."""
        self.payloads[model_id] = Payload(content_type, path=Path(path), filename=filename or Path(path).name)

    def add_zeros(self, model_id: str, size: int, *, filename: str = "zeros.bin") -> None:
        """Serve `size` zero bytes as a single file, without a file on disk."""
        self.payloads[model_id] = Payload("application/octet-stream", zeros=size, filename=filename)

    def add_tar(self, model_id: str, path: Path, *, gzip: bool = False) -> None:
        """Serve an existing tar (or tar.gz) file, e.g. a hand-made malicious one."""
        ctype = "application/gzip" if gzip else "application/x-tar"
        self.payloads[model_id] = Payload(ctype, path=Path(path))

    def add_tree(self, model_id: str, src: Path, out: Path, *, gzip: bool = False) -> Path:
        """Pack directory src into a tar (.tar.gz with gzip) at out and serve it."""
        with tarfile.open(out, "w:gz" if gzip else "w") as tf:
            for p in sorted(Path(src).rglob("*")):
                tf.add(p, arcname=str(p.relative_to(src)), recursive=False)
        self.add_tar(model_id, out, gzip=gzip)
        return out

    def set(self, model_id: str, **knobs: object) -> None:
        """Change knobs for one model (starting from the default behaviour)."""
        self.behaviours[model_id] = replace(self.behaviours.get(model_id, self.default), **knobs)  # type: ignore[arg-type]

    # --- serving ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application (for aiohttp_server or a runner)."""
        app = web.Application()
        app.router.add_post("/api/models/download", self._download)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on loopback; returns the base URL."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        """Stop listening and drop connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _download(self, request: web.Request) -> web.StreamResponse:
        self.request_headers.append(request.headers.copy())
        if self.key is not None and request.headers.get(self.key_header) != self.key:
            return web.json_response({"error": "bad internal key"}, status=401)
        try:
            model_id = (await request.json())["model_id"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'body must be {"model_id": ...}'}, status=400)
        self.requests[model_id] += 1
        b = self.behaviours.get(model_id, self.default)
        if b.delay:
            await asyncio.sleep(b.delay)
        payload = self.payloads.get(model_id)
        if payload is None:
            return web.json_response({"error": f"unknown model {model_id}"}, status=404)
        if b.status is not None:
            return web.json_response({"error": f"configured status {b.status}"}, status=b.status)
        if self.failures[model_id] < b.fail_times:
            self.failures[model_id] += 1
            return web.json_response({"error": "configured failure"}, status=b.fail_status)
        return await self._send(request, payload, b)

    async def _send(self, request: web.Request, payload: Payload, b: Behaviour) -> web.StreamResponse:
        headers = {"Content-Type": payload.content_type}
        if payload.filename:
            headers["Content-Disposition"] = f'attachment; filename="{payload.filename}"'
        if b.send_sha or b.corrupt:
            headers[SHA256_HEADER] = hashlib.sha256(b"corrupt").hexdigest() if b.corrupt else payload.digest()
        plain = b.chunk_delay == 0 and b.truncate_at is None and b.announce_length is None and b.send_length
        if plain and payload.path is not None:
            return web.FileResponse(payload.path, chunk_size=1 << 20, headers=headers)  # sendfile: fast
        resp = web.StreamResponse(headers=headers)
        if b.send_length:
            resp.content_length = b.announce_length if b.announce_length is not None else payload.size
        await resp.prepare(request)
        sent = 0
        for chunk in payload.chunks(b.chunk_size):
            if b.truncate_at is not None and sent + len(chunk) >= b.truncate_at:
                await resp.write(chunk[: b.truncate_at - sent])
                assert request.transport is not None
                request.transport.close()  # the client sees the body end early
                return resp
            await resp.write(chunk)
            sent += len(chunk)
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
        await resp.write_eof()
        return resp


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """Build a tar in memory from raw TarInfo headers (for archives no honest tool would make)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


async def _serve(args: argparse.Namespace) -> None:
    svc = FileService(key=args.key or None)
    for spec in args.file:
        model_id, _, path = spec.partition("=")
        svc.add_file(model_id, Path(path))
        if not args.no_sha:
            await asyncio.get_running_loop().run_in_executor(None, svc.payloads[model_id].digest)
    svc.default = Behaviour(send_sha=not args.no_sha, chunk_delay=args.chunk_delay)
    url = await svc.start(port=args.port)
    print(f"URL {url}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await svc.stop()


def main() -> None:
    """Command-line entry: serve files until signalled."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", action="append", default=[], metavar="MODEL_ID=PATH")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default="test-internal-key")
    parser.add_argument("--no-sha", action="store_true", help="do not send X-Content-SHA256")
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
