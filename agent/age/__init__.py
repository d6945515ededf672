"""age v1 (https://age-encryption.org/v1) for one X25519 recipient, streaming both ways.

Laid out like age's own Go code: :mod:`agent.age.format` (the text header: stanzas, MAC, parse
and write), :mod:`agent.age.stream` (the STREAM-chunked payload), :mod:`agent.age.x25519` (the
recipient type), :mod:`agent.age.primitives` (key derivation) and :mod:`agent.age.bech32`, joined
here: :func:`encrypt` (the device's side) and :class:`AgeDecryptor` (the requester's side).

The files are ordinary age v1 files with one X25519 recipient stanza, which the stock ``age -d``
and every other age implementation decrypt; the reader takes files from them too (with rage's
"grease" stanzas and other recipients' stanzas skipped). The format is written here with
pyca/cryptography's primitives rather than through pyrage because pyrage's streaming API pulls
plaintext through a Python callback every 8 KiB and holds the GIL for the whole file, so nothing
else in the agent (the vault's decryption, the MQTT network thread) can run while it encrypts;
cryptography releases the GIL inside each 64 KiB ChaCha20-Poly1305 call, and its
ChaCha20-Poly1305 is also the faster of the two. The requester decrypts a delivery chunk by chunk
as it arrives, which pyrage cannot do either. pyrage still parses and validates recipient and
identity strings (:mod:`agent.age.x25519`).

The package is pure: it reads and writes only the bytes it is given, and imports nothing of the
agent but :mod:`agent.errors`. Errors: DeliveryError for an unusable recipient on the way out,
ReceiveError for anything wrong with a file on the way in.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.age import format, x25519
from agent.age.primitives import FILE_KEY_BYTES, payload_aead
from agent.age.stream import StreamReader, StreamWriter
from agent.errors import ReceiveError

PAYLOAD_NONCE_BYTES = 16
_MAX_HEADER = 64 * 1024
"""An age header longer than this is refused (ours is about 200 bytes)."""

RandomBytes = Callable[[int], bytes]
"""Returns n cryptographically random bytes (``os.urandom``; injectable for tests)."""


def encrypt(
    recipient: bytes, dst: Callable[[bytes], object], *, randbytes: RandomBytes = os.urandom
) -> StreamWriter:
    """Start an age file for the 32-byte X25519 public key ``recipient``, written to ``dst``.

    ``dst`` gets the header and payload nonce at once, then each sealed chunk as the returned
    writer produces it; the file is complete when the writer is closed. ``randbytes`` supplies
    the file key, the ephemeral X25519 key and the payload nonce, in that order (fresh for every
    file). A low-order ``recipient`` raises DeliveryError before ``dst`` is called.
    """
    file_key = randbytes(FILE_KEY_BYTES)
    header = format.write_header([x25519.wrap(recipient, file_key, randbytes)], file_key)
    nonce = randbytes(PAYLOAD_NONCE_BYTES)
    dst(header + nonce)
    return StreamWriter(payload_aead(file_key, nonce), dst)


class AgeDecryptor:
    """Decrypts an age v1 file for one X25519 identity as its bytes are pushed in, in order.

    :meth:`feed` returns the plaintext of every payload chunk that has authenticated so far (a
    chunk is released only once the next bytes show whether it is the last); :meth:`finish`
    authenticates the last chunk. Every failure raises ReceiveError saying what is wrong: not
    an age file, no stanza for this identity, a header or a chunk that fails authentication,
    a truncated file. Memory stays at about one payload chunk plus the bytes fed at once.
    """

    def __init__(self, identity: X25519PrivateKey) -> None:
        self._identity = identity
        self._buffer = bytearray()
        self._payload: StreamReader | None = None
        self._finished = False

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes of the file; returns the plaintext they complete."""
        if self._finished:
            raise ReceiveError("the age file has data after its end")
        payload = self._payload
        if payload is None:
            self._buffer += data
            payload = self._read_header()
            if payload is None:
                return []
            data = bytes(self._buffer)
            self._buffer.clear()
        return payload.feed(data)

    def finish(self) -> bytes:
        """Authenticate the end of the file; returns the last chunk's plaintext."""
        if self._finished:
            return b""
        if self._payload is None:
            raise ReceiveError("the age file is truncated inside its header")
        last = self._payload.finish()
        self._finished = True
        return last

    def _read_header(self) -> StreamReader | None:
        """Parse and authenticate the header once it and the nonce are in; None until then."""
        end = format.header_end(self._buffer)
        if end is None or end + PAYLOAD_NONCE_BYTES > len(self._buffer):
            if len(self._buffer) > _MAX_HEADER:
                raise ReceiveError("the age header is too long")
            return None
        header = format.parse_header(bytes(self._buffer[:end]))
        file_key = x25519.unwrap(self._identity, header.stanzas)
        header.verify_mac(file_key)
        nonce = bytes(self._buffer[end : end + PAYLOAD_NONCE_BYTES])
        self._payload = StreamReader(payload_aead(file_key, nonce))
        del self._buffer[: end + PAYLOAD_NONCE_BYTES]
        return self._payload
