"""A Unix-socket proxy in front of gpud's admin socket that breaks the first event stream mid-frame, once.

It lets a test watch gpuctl resume a real stream with Last-Event-ID after a real dropped connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path


class CuttingProxy:
    """Forwards connections to `upstream`; cuts the first SSE stream a few bytes after its first text_delta frame."""

    def __init__(self, upstream: str, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        self.requests: list[bytes] = []  # the first bytes of every request seen, in order
        self.cut_done = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._start(self._accept_loop)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._start(self._handle, client)

    def _handle(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.upstream)
            head = client.recv(65536)
            with self._lock:
                self.requests.append(head)
                request_line = head.split(b"\r\n", 1)[0]
                is_stream = request_line.startswith(b"POST /api/tasks/submit") or (
                    request_line.startswith(b"GET /api/tasks/") and b"/events" in request_line
                )
                cut_this = is_stream and not self.cut_done.is_set()
                if cut_this:
                    self.cut_done.set()
            upstream.sendall(head)
            self._start(self._pump, client, upstream)
            self._relay_back(upstream, client, cut=cut_this)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        """Client -> daemon (request bodies, and nothing else on these connections)."""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    @staticmethod
    def _relay_back(upstream: socket.socket, client: socket.socket, *, cut: bool) -> None:
        """Daemon -> client; when cutting, stop 7 bytes into the frame after the first text_delta."""
        seen = b""
        while data := upstream.recv(65536):
            if not cut:
                client.sendall(data)
                continue
            seen += data
            marker = seen.find(b"event: text_delta")
            end = seen.find(b"\n\n", marker) if marker != -1 else -1
            if end != -1 and len(seen) >= end + 2 + 7:
                client.sendall(seen[: end + 2 + 7])  # a whole text_delta, then a torn next frame
                return
        if cut and seen:
            client.sendall(seen)

    def close(self) -> None:
        """Stop accepting and remove the socket file (open relays end with their connections)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
