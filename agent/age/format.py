"""The age v1 header: recipient stanzas, the header MAC, and the text that carries them.

The counterpart of age's ``internal/format``. A header is::

    age-encryption.org/v1
    -> TYPE ARG...            (one stanza: its arguments, then its body in base64
    BODY (64 columns...)       wrapped at 64 columns, the last line shorter, maybe empty)
    --- MAC

where MAC is HMAC-SHA-256 under ``HKDF(file key, info="header")`` over everything up to and
including ``---``. Base64 is standard, unpadded and canonical. :func:`write_header` writes one;
:func:`header_end` finds where one ends in bytes still arriving, and :func:`parse_header` reads
it strictly as age writes it. Which stanza holds the file key is the recipient type's business
(:mod:`agent.age.x25519`). This module is pure: bytes in, bytes out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from agent.age.primitives import hkdf_sha256
from agent.errors import ReceiveError

VERSION_LINE = b"age-encryption.org/v1"
STANZA_COLUMNS = 64
_FOOTER = b"\n---"


def b64_encode(data: bytes) -> bytes:
    """Standard base64 without padding, as the age header writes it."""
    return base64.b64encode(data).rstrip(b"=")


def b64_decode(text: bytes) -> bytes:
    """Strict, canonical, unpadded standard base64; raises ValueError otherwise."""
    if text.endswith(b"=") or len(text) % 4 == 1:
        raise ValueError("not unpadded base64")
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None
    if b64_encode(data) != text:
        # Non-canonical trailing bits would let two encodings name the same bytes.
        raise ValueError("not canonical base64")
    return data


def header_mac(file_key: bytes, header: bytes) -> bytes:
    """The header's HMAC, over everything up to and including the final ``---``."""
    return hmac.new(hkdf_sha256(file_key, b"", b"header"), header, hashlib.sha256).digest()


@dataclass(frozen=True)
class Stanza:
    """One recipient stanza: ``-> TYPE ARG...`` and a body (the wrapped file key)."""

    type: bytes
    args: tuple[bytes, ...]
    body: bytes


def _stanza_text(stanza: Stanza) -> bytes:
    encoded = b64_encode(stanza.body)
    # The last body line is always shorter than a full one, empty if need be: it ends the body.
    lines = [encoded[i : i + STANZA_COLUMNS] for i in range(0, len(encoded) + 1, STANZA_COLUMNS)]
    return b"-> " + b" ".join((stanza.type, *stanza.args)) + b"\n" + b"\n".join(lines) + b"\n"


def write_header(stanzas: Sequence[Stanza], file_key: bytes) -> bytes:
    """The whole text header for ``stanzas``, MAC line and its newline included."""
    text = VERSION_LINE + b"\n" + b"".join(_stanza_text(s) for s in stanzas) + b"---"
    return text + b" " + b64_encode(header_mac(file_key, text)) + b"\n"


@dataclass(frozen=True)
class Header:
    """A parsed header: its stanzas, the text the MAC covers, and the MAC as written."""

    stanzas: list[Stanza]
    text: bytes
    mac_text: bytes

    def verify_mac(self, file_key: bytes) -> None:
        """Raise ReceiveError unless the MAC is the one ``file_key`` gives this header."""
        try:
            mac = b64_decode(self.mac_text)
        except ValueError:
            raise ReceiveError("the age header MAC is not base64") from None
        if not hmac.compare_digest(mac, header_mac(file_key, self.text)):
            raise ReceiveError("the age header failed authentication: tampered with")


def header_end(data: bytes | bytearray) -> int | None:
    """Where the header at the start of ``data`` ends (past its MAC line); None if not yet.

    Raises ReceiveError as soon as the first bytes show this is not an age v1 file.
    """
    if not VERSION_LINE.startswith(data[: len(VERSION_LINE)]):
        raise ReceiveError("not an age v1 file")
    end = data.find(_FOOTER)
    if end < 0:
        return None
    eol = data.find(b"\n", end + 1)
    return None if eol < 0 else eol + 1


def parse_header(data: bytes) -> Header:
    """Parse a complete header (``data`` ends with the MAC line's newline); ReceiveError if bad."""
    end = data.find(_FOOTER) + len(_FOOTER)
    text = data[:end]
    mac_line = data[end:-1]
    lines = text.split(b"\n")
    if lines[0] != VERSION_LINE or not mac_line.startswith(b" "):
        raise ReceiveError("not an age v1 file")
    return Header(stanzas=_parse_stanzas(lines[1:-1]), text=text, mac_text=mac_line[1:])


def _parse_stanzas(lines: list[bytes]) -> list[Stanza]:
    """The recipient stanzas between the version line and ``---``, strictly as age writes them."""
    stanzas: list[Stanza] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith(b"-> "):
            raise ReceiveError("the age header has a malformed line")
        args = line[3:].split(b" ")
        if any(not a or any(c < 33 or c > 126 for c in a) for a in args):
            raise ReceiveError("the age header has a malformed stanza")
        body: list[bytes] = []
        i += 1
        while True:
            if i >= len(lines):
                raise ReceiveError("the age header has an unterminated stanza")
            body.append(lines[i])
            i += 1
            if len(body[-1]) > STANZA_COLUMNS:
                raise ReceiveError("the age header has an over-long stanza line")
            if len(body[-1]) < STANZA_COLUMNS:
                break
        try:
            stanzas.append(Stanza(args[0], tuple(args[1:]), b64_decode(b"".join(body))))
        except ValueError:
            raise ReceiveError("the age header has a stanza body that is not base64") from None
    if not stanzas:
        raise ReceiveError("the age header has no recipient stanza")
    return stanzas
