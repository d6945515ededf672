"""Log lines that requester text cannot forge.

A ``jti``, ``reason`` or any other text a requester signed may hold newlines, terminal escape
sequences or bidi overrides. Written to a log as-is, it can start a fake line ("... ERROR owner
approved ...") or hide part of a real one. :func:`one_line` writes every non-printable
character as its Python escape; :class:`OneLineFormatter` applies it to every log message of
the program (tracebacks, which the program itself makes, stay multi-line).
"""

from __future__ import annotations

import logging

from agent.display import visible


def one_line(value: object, limit: int | None = None) -> str:
    """``value`` (``repr`` unless a string) as printable text on one line, cut to ``limit``
    characters first when given: ``\\n``, ``\\x1b``, ``\\u202e`` and the like become escapes
    (:func:`agent.display.visible`, the same form the app and the listings show)."""
    text = value if isinstance(value, str) else repr(value)
    if limit is not None:
        text = text[:limit]
    return visible(text)


class OneLineFormatter(logging.Formatter):
    """A formatter whose messages are always one printable line (see the module docstring)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The formatted record with its message made printable."""
        record.message = one_line(record.message)
        return super().formatMessage(record)
