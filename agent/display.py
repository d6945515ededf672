"""Text from requesters made visible: what a screen would hide or reorder is shown escaped.

A request's ``reason``, ``case`` and ``legal_ref`` (and anything else a requester signs) reach
the owner verbatim. A newline would forge a line in a listing or log; a bidi control (U+202E
RIGHT-TO-LEFT OVERRIDE and friends) would reorder what the owner reads; zero-width and other
format characters hide text. Every character Python does not call printable (categories Cc,
Cf, Cs, Co, Cn, Zl, Zp and Zs other than the space) is therefore shown as its Python escape
(``\\n``, ``\\u202e``), the same form the command line uses.
"""

from __future__ import annotations


def visible(text: str) -> str:
    """``text`` with every non-printable character replaced by its visible escape."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
