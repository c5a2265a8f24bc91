"""Turn engine log frames (multiplexed stdout/stderr chunks) into whole lines, per stream, in order."""

from __future__ import annotations

import struct

from gpud.runtime.base import LogLine, Stream

FRAME_HEADER = 8
# Stream ids in the 8-byte header of the Docker/libpod multiplexed log format (1 stdout, 2 stderr).
_STREAMS = {1: Stream.STDOUT, 2: Stream.STDERR}
# A line longer than this is emitted in pieces of at most this many bytes (cut between characters, marked
# `partial`), rather than buffered without bound: what a worker prints without a newline is never held whole.
MAX_LINE_BYTES = 64 * 1024


def parse_header(header: bytes) -> tuple[Stream, int]:
    """(stream, payload length) from one frame header; stdin/unknown ids count as stdout."""
    kind, length = struct.unpack(">BxxxL", header)
    return _STREAMS.get(kind, Stream.STDOUT), length


class LineSplitter:
    """Buffers partial lines per stream; `feed` returns the lines (and long-line pieces) a chunk completes."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._max = max_line
        self._partial: dict[Stream, bytes] = {Stream.STDOUT: b"", Stream.STDERR: b""}

    def feed(self, stream: Stream, chunk: bytes) -> list[LogLine]:
        """Lines completed by this chunk, without their newlines; pieces of an over-long line marked partial."""
        lines: list[LogLine] = []
        data = self._partial[stream] + chunk
        start = 0
        while True:
            newline = data.find(b"\n", start, start + self._max + 1)
            if newline >= 0:
                lines.append(self._line(stream, data[start:newline]))
                start = newline + 1
            elif len(data) - start > self._max:
                cut = _char_boundary(data, start + self._max, start)
                lines.append(self._line(stream, data[start:cut], partial=True))
                start = cut
            else:
                break
        self._partial[stream] = data[start:]
        return lines

    def flush(self, only: Stream | None = None) -> list[LogLine]:
        """The unterminated last line of each stream (or of `only`), if any."""
        streams = [only] if only is not None else list(self._partial)
        lines = [self._line(stream, self._partial[stream]) for stream in streams if self._partial[stream]]
        for stream in streams:
            self._partial[stream] = b""
        return lines

    @staticmethod
    def _line(stream: Stream, raw: bytes, partial: bool = False) -> LogLine:
        if not partial:
            raw = raw.rstrip(b"\r")
        return LogLine(stream=stream, line=raw.decode("utf-8", errors="replace"), partial=partial)


def _char_boundary(data: bytes, end: int, start: int) -> int:
    """`end`, moved back to the first byte of the UTF-8 character it falls inside (invalid UTF-8: `end`)."""
    cut = end
    for _ in range(3):  # a character is at most 4 bytes: at most 3 continuation bytes (10xxxxxx) to step over
        if cut - 1 <= start or data[cut] & 0xC0 != 0x80:
            break
        cut -= 1
    return cut if data[cut] & 0xC0 != 0x80 else end
