"""The age v1 payload: STREAM chunked encryption (age's ``internal/stream``).

The plaintext is cut into chunks of :data:`PAYLOAD_CHUNK` bytes, each sealed with
ChaCha20-Poly1305 under the payload key and the nonce :func:`chunk_nonce`: an 11-byte big-endian
chunk counter and a last-chunk flag byte. The counter makes reordered, duplicated or dropped
chunks fail authentication; the flag makes truncation at a chunk boundary and appended data
fail. Every chunk but the last is full; the last is empty only when the whole plaintext is.

This is written out rather than left to pyrage because pyrage's streaming API pulls plaintext
through a Python callback every 8 KiB and holds the GIL for the whole file, and it has no way
to decrypt bytes as they arrive out of a delivery; pyca's ChaCha20-Poly1305 releases the GIL
inside each 64 KiB call (see :mod:`agent.age`).

:class:`StreamWriter` takes plaintext in writes of any size and hands sealed chunks to a
callable; :class:`StreamReader` takes the sealed payload pushed in pieces of any size and returns
the plaintext of each chunk once it has authenticated. Both are pure: bytes in, bytes out.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.age.primitives import TAG_BYTES
from agent.errors import ReceiveError

PAYLOAD_CHUNK = 64 * 1024
"""Plaintext bytes per age payload chunk; each is sealed with a 16-byte tag."""
SEALED_CHUNK = PAYLOAD_CHUNK + TAG_BYTES


def chunk_nonce(counter: int, last: bool) -> bytes:
    """The STREAM nonce of payload chunk ``counter``: 11-byte big-endian counter + last flag."""
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class StreamWriter:
    """Seals plaintext written in pieces of any size into age payload chunks, in order.

    ``dst`` receives each sealed chunk as soon as it is known whether it is the last one: a
    full chunk waits until the next byte is written, or :meth:`close` seals it as the last.
    """

    def __init__(self, aead: ChaCha20Poly1305, dst: Callable[[bytes], object]) -> None:
        self._aead = aead
        self._dst = dst
        self._buffer = bytearray()
        self._held: memoryview | None = None
        self._counter = 0
        self._closed = False

    def write(self, data: bytes | bytearray) -> None:
        """Take the next plaintext bytes (a bytearray may be reused once this returns)."""
        if self._closed:
            raise ValueError("the age stream is closed")
        view = memoryview(data)
        while view:
            if self._held is not None or len(self._buffer) == PAYLOAD_CHUNK:
                # Bytes follow a full chunk, so it is not the last one.
                self._seal(last=False)
            if not self._buffer and len(view) >= PAYLOAD_CHUNK and isinstance(data, bytes):
                # bytes cannot change, so a whole chunk of them waits for its flag uncopied.
                self._held = view[:PAYLOAD_CHUNK]
                view = view[PAYLOAD_CHUNK:]
                continue
            room = PAYLOAD_CHUNK - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]

    def close(self) -> None:
        """Seal the last chunk (empty only if nothing was written). Idempotent."""
        if not self._closed:
            self._seal(last=True)
            self._closed = True

    def _seal(self, *, last: bool) -> None:
        plaintext = self._buffer if self._held is None else self._held
        self._dst(self._aead.encrypt(chunk_nonce(self._counter, last), plaintext, None))
        self._held = None
        self._buffer.clear()
        self._counter += 1


class StreamReader:
    """Opens an age payload pushed in pieces of any size, in order.

    :meth:`feed` returns the plaintext of every chunk that has authenticated so far (a chunk is
    opened only once the next bytes show whether it is the last); :meth:`finish` authenticates
    the last chunk. Every failure raises ReceiveError saying what is wrong. Memory stays at
    about one sealed chunk plus the bytes fed at once.
    """

    def __init__(self, aead: ChaCha20Poly1305) -> None:
        self._aead = aead
        self._buffer = bytearray()
        self._counter = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes of the payload; returns the plaintext they complete."""
        # The buffer holds at most one sealed chunk; whole chunks are opened straight from
        # ``data``. A chunk is opened as non-final only when at least one byte follows it.
        out: list[bytes] = []
        view = memoryview(data)
        pos = 0
        if self._buffer:
            need = SEALED_CHUNK - len(self._buffer)
            if len(view) <= need:
                self._buffer += view
                return out
            self._buffer += view[:need]
            pos = need
            with memoryview(self._buffer) as sealed:
                out.append(self._open(sealed, last=False))
            self._buffer.clear()
        while len(view) - pos > SEALED_CHUNK:
            out.append(self._open(view[pos : pos + SEALED_CHUNK], last=False))
            pos += SEALED_CHUNK
        self._buffer += view[pos:]
        return out

    def finish(self) -> bytes:
        """Authenticate the end of the payload; returns the last chunk's plaintext."""
        if not self._buffer:
            raise ReceiveError("the age file is truncated: it has no payload")
        if len(self._buffer) < TAG_BYTES:
            raise ReceiveError("the age file is truncated inside its last payload chunk")
        with memoryview(self._buffer) as sealed:
            if len(sealed) == SEALED_CHUNK and self._authentic(sealed, last=False):
                raise ReceiveError(
                    f"the age file is truncated: it ends after payload chunk {self._counter} "
                    "without a final chunk"
                )
            last = self._open(sealed, last=True)
        if not last and self._counter > 1:
            raise ReceiveError("the age file ends with an empty final chunk: tampered with")
        self._buffer.clear()
        return last

    def _authentic(self, sealed: memoryview, *, last: bool) -> bool:
        try:
            self._aead.decrypt(chunk_nonce(self._counter, last), sealed, None)
        except InvalidTag:
            return False
        return True

    def _open(self, sealed: memoryview, *, last: bool) -> bytes:
        try:
            plain = self._aead.decrypt(chunk_nonce(self._counter, last), sealed, None)
        except InvalidTag:
            raise ReceiveError(
                f"age payload chunk {self._counter} failed authentication: "
                "file corrupted or tampered with"
            ) from None
        self._counter += 1
        return plain
