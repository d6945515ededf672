"""Streaming age encryption of one clip into fixed-size chunks.

The device writes age v1 files (https://age-encryption.org/v1) with one X25519 recipient stanza,
which the stock ``age -d`` and every other age implementation decrypt. The format itself lives
in :mod:`agent.age` (written with pyca/cryptography's primitives rather than through pyrage:
pyrage holds the GIL for the whole file, see there); pyrage still validates the recipient string.

:func:`encrypt_to_chunks` reads the plaintext, hashes it, encrypts it and cuts the age file into
chunks of ``chunk_bytes`` that go to a sink (the publisher) as soon as each is full: at most one
MQTT chunk plus one age payload chunk is held at a time whatever the clip size, and no plaintext
is ever written anywhere.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyrage import x25519

from agent import age
from agent.age.stream import PAYLOAD_CHUNK
from agent.age.x25519 import recipient_key

ChunkSink = Callable[[int, bytes], None]
"""Called with (seq, chunk) for each chunk of the age file, in order, 0-based."""

_READ_AHEAD = 4
"""Plaintext blocks read ahead of the encryption (64 KiB each)."""


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


class _Chunker:
    """Cuts the age file into chunks of ``chunk_bytes`` for the sink, hashing them.

    Pieces are kept as views until a chunk is complete and then joined once, so each byte is
    copied once on its way to the sink.
    """

    def __init__(self, chunk_bytes: int, sink: ChunkSink) -> None:
        self._chunk_bytes = chunk_bytes
        self._sink = sink
        self._pieces: list[memoryview] = []
        self._pending = 0
        self.digest = hashlib.sha256()
        self.count = 0
        self.seq = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while self._pending + len(view) >= self._chunk_bytes:
            room = self._chunk_bytes - self._pending
            self._pieces.append(view[:room])
            view = view[room:]
            self._emit()
        if view:
            self._pieces.append(view)
            self._pending += len(view)

    def finish(self) -> None:
        """Emit the last, short chunk."""
        if self._pieces:
            self._emit()

    def _emit(self) -> None:
        chunk = b"".join(self._pieces)
        self._pieces.clear()
        self._pending = 0
        self.digest.update(chunk)
        self.count += len(chunk)
        self._sink(self.seq, chunk)
        self.seq += 1


def _read_full(reader: ClipReader, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream."""
    data = reader.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n and (more := reader.read(n - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _ReadAhead:
    """Reads and hashes the plaintext on its own thread, a few payload chunks ahead.

    The vault's decryption and SHA-256 release the GIL, so they run while the caller encrypts
    the previous chunk or waits for the broker to acknowledge one. The queue holds at most
    ``depth`` blocks of :data:`PAYLOAD_CHUNK` bytes whatever the clip size. A block shorter
    than that (possibly empty) ends the stream; an exception from the reader is handed over in
    its place and raised by :meth:`get`.
    """

    def __init__(self, reader: ClipReader, depth: int) -> None:
        self._reader = reader
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.digest = hashlib.sha256()
        self.count = 0
        self._thread = threading.Thread(target=self._run, name="age-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                block = _read_full(self._reader, PAYLOAD_CHUNK)
                self.digest.update(block)
                self.count += len(block)
                self._put(block)
                if len(block) < PAYLOAD_CHUNK:
                    return
        except BaseException as exc:
            # Raised again on the consuming thread, unchanged (a vault TamperError stays one).
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> bytes:
        """The next block; raises what the reader raised."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop reading and wait for the thread, so the caller may close the reader. Idempotent."""
        self._stop.set()
        self._thread.join()


def encrypt_to_chunks(
    reader: ClipReader,
    recipient: x25519.Recipient | str,
    chunk_bytes: int,
    sink: ChunkSink,
    *,
    randbytes: age.RandomBytes = os.urandom,
) -> EncryptedClip:
    """Encrypt ``reader`` with age to ``recipient`` and pass the age file to ``sink`` in chunks.

    Every chunk but the last is exactly ``chunk_bytes`` long. An exception raised by the reader
    or the sink (a vault TamperError, an MQTT disconnect) propagates unchanged; an unusable
    recipient raises DeliveryError before anything reaches the sink. ``randbytes`` supplies the
    file key, the ephemeral X25519 key and the payload nonce (fresh for every file).
    """
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    key = recipient_key(recipient)
    out = _Chunker(chunk_bytes, sink)
    payload = age.encrypt(key, out.write, randbytes=randbytes)
    source = _ReadAhead(reader, _READ_AHEAD)
    try:
        while True:
            block = source.get()
            payload.write(block)
            if len(block) < PAYLOAD_CHUNK:
                break
        payload.close()
    finally:
        source.close()
    out.finish()
    return EncryptedClip(
        chunks=out.seq,
        bytes=out.count,
        sha256=out.digest.hexdigest(),
        plaintext_bytes=source.count,
        plaintext_sha256=source.digest.hexdigest(),
    )
