"""Turn engine log frames (multiplexed stdout/stderr chunks) into whole lines, per stream, in order."""

from __future__ import annotations

import struct

from gpud.runtime.base import LogLine, Stream

FRAME_HEADER = 8
# Stream ids in the 8-byte header of the Docker/libpod multiplexed log format (1 stdout, 2 stderr).
_STREAMS = {1: Stream.STDOUT, 2: Stream.STDERR}
# A line longer than this is emitted in pieces rather than buffered without bound.
MAX_LINE_BYTES = 1024 * 1024


def parse_header(header: bytes) -> tuple[Stream, int]:
    """(stream, payload length) from one frame header; stdin/unknown ids count as stdout."""
    kind, length = struct.unpack(">BxxxL", header)
    return _STREAMS.get(kind, Stream.STDOUT), length


class LineSplitter:
    """Buffers partial lines per stream; `feed` returns the lines a chunk completes."""

    def __init__(self) -> None:
        self._partial: dict[Stream, bytes] = {Stream.STDOUT: b"", Stream.STDERR: b""}

    def feed(self, stream: Stream, chunk: bytes) -> list[LogLine]:
        """Lines completed by this chunk, without their newlines."""
        data = self._partial[stream] + chunk
        *complete, rest = data.split(b"\n")
        lines = [self._line(stream, raw) for raw in complete]
        if len(rest) > MAX_LINE_BYTES:
            lines.append(self._line(stream, rest))
            rest = b""
        self._partial[stream] = rest
        return lines

    def flush(self, only: Stream | None = None) -> list[LogLine]:
        """The unterminated last line of each stream (or of `only`), if any."""
        streams = [only] if only is not None else list(self._partial)
        lines = [self._line(stream, self._partial[stream]) for stream in streams if self._partial[stream]]
        for stream in streams:
            self._partial[stream] = b""
        return lines

    @staticmethod
    def _line(stream: Stream, raw: bytes) -> LogLine:
        return LogLine(stream=stream, line=raw.rstrip(b"\r").decode("utf-8", errors="replace"))
