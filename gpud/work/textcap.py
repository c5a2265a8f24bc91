"""Text with a size limit: UTF-8 lengths, cuts and splits at character boundaries, and a bounded output buffer."""

from __future__ import annotations

from collections.abc import Iterator


def utf8_len(text: str) -> int:
    """The length of `text` in UTF-8 bytes (lone surrogates count as the 3 bytes U+FFFD takes)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def cut_utf8(text: str, limit: int) -> str:
    """The longest prefix of `text` that is at most `limit` UTF-8 bytes (never half a character)."""
    if limit <= 0:
        return ""
    if text.isascii():
        return text[:limit]
    if len(text) * 4 <= limit:
        return text
    # A character cut in half leaves an incomplete sequence at the end, which "ignore" drops.
    return text.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore")


def split_utf8(text: str, limit: int) -> Iterator[str]:
    """`text` in pieces of at most `limit` UTF-8 bytes each (at least one character each); joined they are `text`."""
    while utf8_len(text) > limit:
        piece = cut_utf8(text, limit) or text[0]
        yield piece
        text = text[len(piece) :]
    if text:
        yield text


def truncate_line(line: str, limit: int, dropped: int = 0) -> tuple[str, int]:
    """(line cut to `limit` UTF-8 bytes plus a marker saying how much was cut, bytes cut); `dropped` bytes of the
    line were already left out before it got here (they count as cut)."""
    size = utf8_len(line)
    if size <= limit and not dropped:
        return line, 0
    kept = cut_utf8(line, limit)
    cut = size - utf8_len(kept) + dropped
    return f"{kept}… [{cut} more bytes cut by gpud]", cut


class LongLines:
    """Turns a runtime's pieces of over-long lines (LogLine.partial) back into one line per stream: its first
    piece and the number of bytes of the pieces after it (a log line is cut anyway; the rest is not kept)."""

    def __init__(self) -> None:
        self._heads: dict[str, str] = {}
        self._dropped: dict[str, int] = {}

    def feed(self, stream: str, text: str, partial: bool) -> tuple[str, int] | None:
        """(line, bytes left out) when a line is complete; None while a long line goes on."""
        head = self._heads.get(stream)
        if head is None:
            if not partial:
                return text, 0
            self._heads[stream] = text
            self._dropped[stream] = 0
            return None
        self._dropped[stream] += utf8_len(text)
        if partial:
            return None
        del self._heads[stream]
        return head, self._dropped.pop(stream)

    def flush(self) -> list[tuple[str, str, int]]:
        """(stream, line, bytes left out) of every line still open (the output ended without its newline)."""
        open_lines = [(stream, head, self._dropped.get(stream, 0)) for stream, head in self._heads.items()]
        self._heads.clear()
        self._dropped.clear()
        return open_lines


class TextBuffer:
    """A task's text output: appended in pieces, read whole, never more than `limit` UTF-8 bytes.

    Small pieces are joined in batches, so a million one-character deltas cost a few joined strings, not a
    million string objects."""

    _BATCH_CHARS = 64 * 1024
    _BATCH_PIECES = 1024

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0  # UTF-8 bytes held
        self.cut = 0  # UTF-8 bytes refused at the limit
        self._chunks: list[str] = []
        self._small: list[str] = []
        self._small_chars = 0

    def append(self, text: str) -> str:
        """Add text; returns what was kept (all of it, a prefix at the limit, or nothing)."""
        size = utf8_len(text)
        if self.size + size > self.limit:
            kept = cut_utf8(text, self.limit - self.size)
            kept_size = utf8_len(kept)
            self.cut += size - kept_size
            text, size = kept, kept_size
        if not text:
            return ""
        self.size += size
        self._small.append(text)
        self._small_chars += len(text)
        if self._small_chars >= self._BATCH_CHARS or len(self._small) >= self._BATCH_PIECES:
            self._chunks.append("".join(self._small))
            self._small.clear()
            self._small_chars = 0
        return text

    def replace(self, text: str) -> str:
        """Make `text` the whole output (cut at the limit); returns what is kept."""
        self._chunks.clear()
        self._small.clear()
        self._small_chars = 0
        self.size = 0
        earlier, self.cut = self.cut, 0
        kept = self.append(text)
        self.cut = max(earlier, self.cut)  # both describe the same output running over the limit
        return kept

    def pieces(self) -> list[str]:
        """The output as the pieces it is held in (joined, they are `text`), without joining them."""
        return [*self._chunks, *self._small]

    @property
    def text(self) -> str:
        """The whole output (joined once and kept that way)."""
        if self._small or len(self._chunks) > 1:
            whole = "".join([*self._chunks, *self._small])
            self._chunks[:] = [whole]
            self._small.clear()
            self._small_chars = 0
        return self._chunks[0] if self._chunks else ""

    def __bool__(self) -> bool:
        return self.size > 0
