"""Streaming age encryption of one clip into fixed-size chunks.

pyrage's ``encrypt_io`` drives the stream: it pulls plaintext from a reader with ``read(n)`` and
pushes the age file into a writer with ``write(bytes)``. We give it a reader that hashes what it
reads and a writer that cuts the age file into chunks of ``chunk_bytes`` and hands each one to a
sink (the publisher) as soon as it is full, so at most one chunk plus pyrage's small buffers is
held at a time whatever the clip size, and no plaintext is ever written anywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BufferedIOBase
from typing import Protocol, cast

import pyrage
from pyrage import x25519

from agent.errors import DeliveryError

ChunkSink = Callable[[int, bytes], None]
"""Called with (seq, chunk) for each chunk of the age file, in order, 0-based."""


class ClipReader(Protocol):
    """A plaintext stream: ``read(n)`` returns at most n bytes, ``b""`` at the end."""

    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class EncryptedClip:
    """What came out of encrypting one clip: the figures the manifest vouches for."""

    chunks: int
    bytes: int
    sha256: str
    plaintext_bytes: int
    plaintext_sha256: str


def parse_recipient(text: str) -> x25519.Recipient:
    """An age X25519 recipient from its ``age1...`` string; raises DeliveryError if malformed."""
    if not isinstance(text, str) or not text.startswith("age1"):
        raise DeliveryError(f"{text!r} is not an age X25519 recipient (age1...)")
    try:
        return x25519.Recipient.from_str(text)
    except pyrage.RecipientError as exc:
        raise DeliveryError(f"{text!r} is not a valid age X25519 recipient: {exc}") from None


class _HashingReader:
    """Feeds pyrage from the clip reader, hashing the plaintext on the way."""

    def __init__(self, source: ClipReader) -> None:
        self._source = source
        self.digest = hashlib.sha256()
        self.count = 0
        self.error: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._source.read(n)
        except BaseException as exc:
            # pyrage flattens any Python exception into an EncryptError string; keep the
            # original so the caller sees a TamperError or an I/O error for what it is.
            self.error = exc
            raise
        self.digest.update(data)
        self.count += len(data)
        return data


class _ChunkingWriter:
    """Receives the age file from pyrage and emits it as fixed-size chunks."""

    def __init__(self, chunk_bytes: int, sink: ChunkSink) -> None:
        self._chunk_bytes = chunk_bytes
        self._sink = sink
        self._buffer = bytearray()
        self.digest = hashlib.sha256()
        self.count = 0
        self.seq = 0
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            room = self._chunk_bytes - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) == self._chunk_bytes:
                self._emit()
        return len(data)

    def flush(self) -> None:
        """Nothing to do: a chunk is only emitted when full or at the end (see ``finish``)."""

    def finish(self) -> None:
        """Emit the last, short chunk."""
        if self._buffer:
            self._emit()

    def _emit(self) -> None:
        chunk = bytes(self._buffer)
        self._buffer.clear()
        self.digest.update(chunk)
        self.count += len(chunk)
        try:
            self._sink(self.seq, chunk)
        except BaseException as exc:
            self.error = exc
            raise
        self.seq += 1


def encrypt_to_chunks(
    reader: ClipReader,
    recipient: x25519.Recipient | str,
    chunk_bytes: int,
    sink: ChunkSink,
) -> EncryptedClip:
    """Encrypt ``reader`` with age to ``recipient`` and pass the age file to ``sink`` in chunks.

    Every chunk but the last is exactly ``chunk_bytes`` long. An exception raised by the reader
    or the sink (a vault TamperError, an MQTT disconnect) propagates unchanged; a failure inside
    age itself becomes a DeliveryError.
    """
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    rcpt = parse_recipient(recipient) if isinstance(recipient, str) else recipient
    source = _HashingReader(reader)
    out = _ChunkingWriter(chunk_bytes, sink)
    try:
        # pyrage only calls read()/write()/flush() on these, which is all they implement.
        pyrage.encrypt_io(cast(BufferedIOBase, source), cast(BufferedIOBase, out), [rcpt])
    except pyrage.EncryptError as exc:
        original = source.error or out.error
        if original is not None:
            raise original from None
        raise DeliveryError(f"age encryption failed: {exc}") from None
    # pyrage's final buffer flush happens when its writer is dropped, where Rust ignores
    # errors, so a sink failure there only shows up in our own record of it.
    if out.error is not None:
        raise out.error
    out.finish()
    return EncryptedClip(
        chunks=out.seq,
        bytes=out.count,
        sha256=out.digest.hexdigest(),
        plaintext_bytes=source.count,
        plaintext_sha256=source.digest.hexdigest(),
    )
