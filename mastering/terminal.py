"""What the command line prints: rich on a terminal, plain lines everywhere else.

Off a terminal (a log file, the journal, ``| grep``) every message is one line with no colour
and no wrapping, so a whole path or UID is found by grep. On a terminal, colour, tables and
the progress bar. Text from outside the program (file names, values, exception messages) is
never read as markup and is printed with its control characters escaped: a newline in a file
name must not forge a line of its own, an escape sequence must not reach the terminal.
"""

from __future__ import annotations

import sys
from typing import TextIO

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object) -> str:
    """text as one printable line: control, format and separator characters escaped
    (``\\n``, ``\\x1b``, ``\\u202e``), undecodable bytes of a file name as ``\\xNN``."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(_escape(ch) for ch in text)


def _escape(ch: str) -> str:
    if ch.isprintable():
        return ch
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class Printer:
    """One output stream. ``line`` takes pieces: plain strings, or (text, style) pairs whose
    style shows only on a terminal. Pieces are printed as given: escape outside text with
    :func:`printable` first."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.terminal = _isatty(self.stream)
        self.console = None
        if self.terminal:  # rich loads only for a terminal
            from rich.console import Console

            self.console = Console(file=self.stream, highlight=False)

    def line(self, *pieces: str | tuple[str, str]) -> None:
        if self.console is not None:
            from rich.text import Text

            text = Text()
            for piece in pieces:
                text.append(*(piece if isinstance(piece, tuple) else (piece,)))
            self.console.print(text, soft_wrap=False)
            return
        plain = "".join(p[0] if isinstance(p, tuple) else p for p in pieces)
        print(plain, file=self.stream, flush=True)

    def print(self, renderable: object) -> None:
        """A rich renderable (a table, a tree): only ever called on a terminal."""
        assert self.console is not None
        self.console.print(renderable)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
