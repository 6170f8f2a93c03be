"""Errors every layer may raise towards a person."""
from __future__ import annotations


class CLIError(Exception):
    """A user-facing error of a ``vmgrid`` command: printed as `vmgrid: <message>`, exit status 1."""


# What a terminal would act on instead of showing: the C0 and C1 controls (ESC, CSI U+009B, OSC U+009D, BEL,
# backspace, carriage return, newline ...), DEL, the line and paragraph separators, and the bidirectional
# controls (an override reverses what follows it on the screen), and U+FFFE and U+FFFF (no XML document may hold
# them: a peer's words put in a SOAP answer raw would make the whole answer fail)
_UNSAFE = {c for c in range(0x20)} | {c for c in range(0x7F, 0xA0)} | {
    0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF, 0xFFFE, 0xFFFF}
_ESCAPES = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _UNSAFE}


def printable(text: object, limit: int | None = 2000) -> str:
    """``text`` (a service's or a peer's words: a fault's description, a name, a state) safe to print on one line of
    a terminal: every control character, line break and bidirectional control shown escaped (``\\x1b``,
    ``\\x0a``, ``\\u202e``), so nothing a server sends moves the cursor, sets a title, fakes a second line or
    reorders what is shown; longer than ``limit`` characters, cut there with the count of the rest."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text.translate(_ESCAPES)


_STREAM_ESCAPES = {c: e for c, e in _ESCAPES.items() if c not in (0x0A, 0x09)}


class EscapingStream:
    """A text stream that shows escaped what a terminal would act on (as :func:`printable`, line breaks and tabs
    kept): the `vmgrid` command's stdout and stderr, so that no line it prints, whichever service's words it
    carries, drives the terminal. ``unfiltered``: the stream itself (the waiting spinner's backspaces)."""

    def __init__(self, stream):
        self.unfiltered = stream

    def write(self, text: str) -> int:
        return self.unfiltered.write(text.translate(_STREAM_ESCAPES))

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self.unfiltered, name)
