"""A small etcd v3 client over etcd's gRPC-JSON gateway (`/v3/...`, etcd 3.4+), on aiohttp.

Why the gateway and not a gRPC client: aiohttp is already gpud's dependency, the gateway is part of every etcd
server (no proxy to run), and the few calls fleet mode needs (put, range, delete, leases, one watch) are plain JSON.
Keys and values travel base64-encoded; int64 fields arrive as strings. On a connection failure the next endpoint
is tried; when none answers, EtcdUnavailable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)

# One unary call (put, range, keepalive) may take this long before the next endpoint is tried.
CALL_TIMEOUT_SECONDS = 3.0


class EtcdUnavailable(Exception):
    """No etcd endpoint answered (or the cluster has no quorum)."""


class EtcdError(Exception):
    """etcd answered with an error (e.g. `requested lease not found`)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class KeyValue:
    """One key with its value and the revision that last changed it."""

    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class WatchEvent:
    """A put or a delete under a watched prefix; `prev` is the value before (for deletes: what was removed)."""

    kind: str  # "put" | "delete"
    kv: KeyValue
    prev: KeyValue | None


@dataclass(frozen=True)
class EtcdOptions:
    """How to reach etcd: endpoints, TLS files, user and password."""

    endpoints: Sequence[str]
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None


def b64(text: str | bytes) -> str:
    """base64 of a key or value, as the gateway wants it."""
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with `prefix` (its last byte plus one)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


def put_op(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    """One put of a txn."""
    put: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


def delete_op(key: str) -> dict[str, Any]:
    """One delete of a txn."""
    return {"request_delete_range": {"key": b64(key)}}


def _kv(data: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(data.get("key", "")).decode(errors="replace"),
        value=base64.b64decode(data.get("value", "")),
        mod_revision=int(data.get("mod_revision", 0)),
        lease=int(data.get("lease", 0)),
    )


def _ssl_context(options: EtcdOptions) -> ssl.SSLContext | None:
    if not any(url.startswith("https://") for url in options.endpoints):
        return None
    context = ssl.create_default_context(cafile=str(options.ca_file) if options.ca_file else None)
    if options.cert_file is not None:
        context.load_cert_chain(str(options.cert_file), str(options.key_file) if options.key_file else None)
    return context


class EtcdClient:
    """put/range/delete, leases and a prefix watch; tries the endpoints in turn, staying on the one that works."""

    def __init__(self, options: EtcdOptions) -> None:
        if not options.endpoints:
            raise ValueError("no etcd endpoint")
        self._options = options
        self._endpoints = list(options.endpoints)
        self._current = 0
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint in use now."""
        return self._endpoints[self._current]

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=_ssl_context(self._options) or False, limit=32)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        """Close the HTTP connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One unary gateway call, e.g. call("/v3/kv/put", {...}); the next endpoint on a connection failure."""
        last: Exception | None = None
        for _ in range(len(self._endpoints)):
            try:
                return await self._call_once(path, body)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = exc
                logger.debug("etcd %s failed on %s: %s", path, self.endpoint, exc)
                self._current = (self._current + 1) % len(self._endpoints)
        raise EtcdUnavailable(f"no etcd endpoint answered ({', '.join(self._endpoints)}): {last}")

    async def _call_once(self, path: str, body: dict[str, Any], retried: bool = False) -> dict[str, Any]:
        headers = await self._auth_headers()
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS)
        async with self._http().post(self.endpoint + path, json=body, headers=headers, timeout=timeout) as response:
            data = await response.json(content_type=None)
        if isinstance(data, dict) and "error" in data:
            message = str(data.get("message") or data["error"])
            if "auth token" in message and self._options.username and not retried:
                self._token = None  # expired simple token: authenticate again, once
                return await self._call_once(path, body, retried=True)
            if "no leader" in message or "timed out" in message:
                raise aiohttp.ClientError(message)  # this member has no quorum: try another
            raise EtcdError(message, data.get("code"))
        if not isinstance(data, dict):
            raise EtcdError(f"unexpected answer from etcd: {str(data)[:200]}")
        return data

    async def _auth_headers(self) -> dict[str, str]:
        if not self._options.username:
            return {}
        if self._token is None:
            body = {"name": self._options.username, "password": self._options.password or ""}
            timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS)
            url = self.endpoint + "/v3/auth/authenticate"
            async with self._http().post(url, json=body, timeout=timeout) as response:
                data = await response.json(content_type=None)
            if "token" not in data:
                raise EtcdError(f"etcd refused user {self._options.username!r}: {data.get('message', data)}")
            self._token = str(data["token"])
        return {"Authorization": self._token}

    async def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        """Set a key (under a lease when given); the new revision."""
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        data = await self.call("/v3/kv/put", body)
        return int(data.get("header", {}).get("revision", 0))

    async def get_prefix(self, prefix: str, range_end: str | None = None) -> tuple[list[KeyValue], int]:
        """Every key under a prefix (or from `prefix` up to `range_end`), and the revision they were read at."""
        end = range_end or prefix_end(prefix)
        data = await self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
        kvs = [_kv(item) for item in data.get("kvs", [])]
        return kvs, int(data.get("header", {}).get("revision", 0))

    async def txn(self, ops: Sequence[dict[str, Any]]) -> None:
        """Several puts and deletes (put_op, delete_op) applied at once, atomically, in one call."""
        if ops:
            await self.call("/v3/kv/txn", {"success": list(ops)})

    async def get(self, key: str) -> KeyValue | None:
        """One key, or None."""
        data = await self.call("/v3/kv/range", {"key": b64(key)})
        kvs = data.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    async def delete(self, key: str) -> int:
        """Remove a key; how many were removed."""
        data = await self.call("/v3/kv/deleterange", {"key": b64(key)})
        return int(data.get("deleted", 0))

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""
        data = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(data["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew a lease; its TTL now, 0 when it has expired (its keys are gone)."""
        data = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """End a lease now (its keys go at once)."""
        with contextlib.suppress(EtcdError):  # already expired: nothing left to remove
            await self.call("/v3/lease/revoke", {"ID": str(lease)})

    async def watch(self, prefix: str, start_revision: int, range_end: str | None = None) -> AsyncIterator[WatchEvent]:
        """Events under `prefix` (or up to `range_end`) from `start_revision`, as they happen, until the stream
        breaks (then the caller lists again and watches from the new revision). Raises EtcdUnavailable, or
        EtcdError when cancelled (e.g. the revision was compacted)."""
        create = {
            "key": b64(prefix),
            "range_end": b64(range_end or prefix_end(prefix)),
            "start_revision": str(start_revision),
            "prev_kv": True,
        }
        headers = await self._auth_headers()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CALL_TIMEOUT_SECONDS)
        url = self.endpoint + "/v3/watch"
        try:
            async with self._http().post(
                url, json={"create_request": create}, headers=headers, timeout=timeout
            ) as response:
                async for message in _json_lines(response):
                    result = message.get("result")
                    if result is None:
                        raise EtcdError(f"watch failed: {message.get('error', message)}")
                    if result.get("canceled"):
                        raise EtcdError(f"watch cancelled: {result.get('cancel_reason', 'compacted?')}")
                    for event in result.get("events") or []:
                        prev = event.get("prev_kv")
                        kind = "delete" if event.get("type") == "DELETE" else "put"
                        yield WatchEvent(kind, _kv(event.get("kv", {})), _kv(prev) if prev else None)
        except (aiohttp.ClientError, OSError) as exc:
            self._current = (self._current + 1) % len(self._endpoints)
            raise EtcdUnavailable(f"etcd watch on {url} broke: {exc}") from exc


async def _json_lines(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The gateway streams one JSON object per line; a line may arrive in pieces."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)
    if buffer.strip():
        yield json.loads(buffer)
    raise aiohttp.ClientPayloadError("the watch stream ended")


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True when `stop` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
