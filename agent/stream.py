"""STREAM chunked authenticated encryption (the construction of age and Tink, Hoang et al. 2015).

A stream is ``header || tag || chunk_0 || ... || chunk_last`` where

* ``header`` is caller-chosen bytes (the vault puts the format, cipher, chunk size and clip id
  there) and ``tag`` is HMAC-SHA256 over it under a key derived from the stream key, so a reader
  names a damaged header before touching the payload;
* every chunk is ``chunk_size`` plaintext bytes (the last one 0..chunk_size, empty only when the
  whole stream is empty) sealed with an AEAD under a payload key derived from the stream key AND
  the header, with nonce ``counter (11 bytes, big endian) || last-flag (1 byte)``.

The counter makes reordered, duplicated or dropped chunks fail authentication; the last flag
makes truncation at a chunk boundary and appended data fail; deriving the payload key from the
header binds chunks to their header. Keys must never be reused across streams (the vault makes a
fresh random key per clip), which is what makes a counter nonce safe.

This module is pure: it reads and writes binary file objects it is given and never opens files.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# age's own nonce: the vault's chunks are counted and closed the way age's payload chunks are.
from agent.age.stream import chunk_nonce
from agent.errors import TamperError

AES_256_GCM = "aes-256-gcm"
CHACHA20_POLY1305 = "chacha20-poly1305"
CIPHERS: tuple[str, ...] = (AES_256_GCM, CHACHA20_POLY1305)

KEY_SIZE = 32
TAG_SIZE = 16
HEADER_TAG_SIZE = 32
NONCE_SIZE = 12
MIN_CHUNK_SIZE = 1
MAX_CHUNK_SIZE = 16 * 1024 * 1024

_HEADER_INFO = b"doorbell-agent stream v1 header"
_PAYLOAD_INFO = b"doorbell-agent stream v1 payload"


class Sink(Protocol):
    """Where a writer puts ciphertext; ``write`` must consume the whole buffer before returning."""

    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...


class Source(Protocol):
    """Where a reader gets ciphertext; ``read(n)`` returns at most n bytes, b"" at the end."""

    def read(self, n: int = -1, /) -> bytes: ...


def cpu_has_aes(cpuinfo: str) -> bool:
    """Whether a ``/proc/cpuinfo`` text advertises AES instructions.

    x86 lists them in ``flags``, arm64 in ``Features``; the flag is the word ``aes``.
    """
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in ("flags", "features") and "aes" in value.split():
            return True
    return False


def resolve_cipher(setting: str, cpuinfo: str) -> str:
    """Turn ``storage.cipher`` (``auto`` or a cipher name) into a cipher name.

    ``auto`` picks AES-256-GCM when the CPU has AES instructions (constant time and fast there)
    and ChaCha20-Poly1305 otherwise (e.g. Raspberry Pi 4, whose Cortex-A72 lacks them).
    """
    if setting == "auto":
        return AES_256_GCM if cpu_has_aes(cpuinfo) else CHACHA20_POLY1305
    if setting not in CIPHERS:
        raise ValueError(f"unknown cipher {setting!r}; use auto, {', '.join(CIPHERS)}")
    return setting


def new_aead(cipher: str, key: bytes) -> AESGCM | ChaCha20Poly1305:
    """The pyca AEAD object for ``cipher`` under a 32-byte ``key``."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"stream keys are {KEY_SIZE} bytes, got {len(key)}")
    if cipher == AES_256_GCM:
        return AESGCM(key)
    if cipher == CHACHA20_POLY1305:
        return ChaCha20Poly1305(key)
    raise ValueError(f"unknown cipher {cipher!r}; use one of {', '.join(CIPHERS)}")


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=KEY_SIZE, salt=None, info=info).derive(key)


def header_tag(key: bytes, header: bytes) -> bytes:
    """HMAC-SHA256 of ``header`` under the stream's header key."""
    return hmac.digest(_hkdf(key, _HEADER_INFO), header, "sha256")


def _payload_aead(key: bytes, header: bytes, cipher: str) -> AESGCM | ChaCha20Poly1305:
    return new_aead(cipher, _hkdf(key, _PAYLOAD_INFO + hashlib.sha256(header).digest()))


def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(
            f"chunk size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes, got {chunk_size}"
        )


def sealed_header_size(header: bytes) -> int:
    """Bytes the header and its tag take at the start of a stream."""
    return len(header) + HEADER_TAG_SIZE


def ciphertext_size(header: bytes, plaintext_bytes: int, chunk_size: int) -> int:
    """The exact size of a complete stream carrying ``plaintext_bytes``."""
    chunks = max(1, -(-plaintext_bytes // chunk_size))
    return sealed_header_size(header) + plaintext_bytes + chunks * TAG_SIZE


def _read_exact(source: Source, n: int) -> bytes:
    """Read up to ``n`` bytes, looping over short reads; fewer only at end of file."""
    parts: list[bytes] = []
    remaining = n
    while remaining:
        part = source.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class StreamWriter:
    """Encrypts a plaintext stream into ``sink`` chunk by chunk; memory stays at one chunk.

    The header and its tag are written at once; ``write`` seals every chunk that is known not
    to be the last; ``finish`` seals the final one. ``sink`` must consume the buffer it is
    given before returning (a buffered ``io`` file does; a raw one may write short).
    """

    def __init__(
        self,
        sink: Sink,
        key: bytes,
        header: bytes,
        *,
        cipher: str,
        chunk_size: int,
    ) -> None:
        _check_chunk_size(chunk_size)
        self._sink = sink
        self._aead = _payload_aead(key, header, cipher)
        self._chunk_size = chunk_size
        self._pending = bytearray()
        self._out = bytearray(chunk_size + TAG_SIZE)
        self._counter = 0
        self._plaintext_bytes = 0
        self._finished = False
        sink.write(header + header_tag(key, header))
        self._ciphertext_bytes = sealed_header_size(header)

    @property
    def plaintext_bytes(self) -> int:
        """Plaintext bytes accepted so far (sealed or pending)."""
        return self._plaintext_bytes

    @property
    def ciphertext_bytes(self) -> int:
        """Bytes handed to the sink so far, header included."""
        return self._ciphertext_bytes

    @property
    def chunks_written(self) -> int:
        """Chunks sealed and handed to the sink so far."""
        return self._counter

    def _seal(self, plaintext: bytes | bytearray | memoryview, last: bool) -> None:
        n = len(plaintext)
        out = memoryview(self._out)[: n + TAG_SIZE]
        self._aead.encrypt_into(chunk_nonce(self._counter, last), plaintext, None, out)
        self._sink.write(out)
        self._counter += 1
        self._ciphertext_bytes += n + TAG_SIZE

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Accept plaintext; seal every full chunk that more data is known to follow."""
        if self._finished:
            raise ValueError("write to a finished stream")
        view = memoryview(data).cast("B")
        size = len(view)
        cs = self._chunk_size
        pos = 0
        pending = self._pending
        while True:
            # A full pending chunk is sealed only once more data proves it is not the last.
            if len(pending) == cs and pos < size:
                self._seal(pending, last=False)
                pending.clear()
            if not pending and size - pos > cs:
                self._seal(view[pos : pos + cs], last=False)
                pos += cs
                continue
            take = min(cs - len(pending), size - pos)
            if take == 0:
                break
            pending += view[pos : pos + take]
            pos += take
        self._plaintext_bytes += size
        return size

    def finish(self) -> int:
        """Seal the final chunk and return the total plaintext bytes. Idempotent."""
        if not self._finished:
            self._seal(self._pending, last=True)
            self._pending.clear()
            self._finished = True
        return self._plaintext_bytes


class StreamReader:
    """Decrypts and authenticates a stream from ``source``; memory stays at two chunks.

    Every failure raises :class:`TamperError` naming ``label`` and the chunk: a damaged
    header, a chunk that fails authentication (bit flip, reordering, duplication, a chunk from
    another stream), a stream that ends without its final chunk (truncation, also at a chunk
    boundary) and data after the final chunk.
    """

    def __init__(
        self,
        source: Source,
        key: bytes,
        header: bytes,
        *,
        cipher: str,
        chunk_size: int,
        label: str = "stream",
    ) -> None:
        _check_chunk_size(chunk_size)
        self._source = source
        self._aead = _payload_aead(key, header, cipher)
        self._chunk_size = chunk_size
        self._label = label
        self._counter = 0
        self._done = False
        self._plain = bytearray(chunk_size)
        self._view = memoryview(self._plain)[:0]
        self._plaintext_bytes = 0
        expected = header + header_tag(key, header)
        got = _read_exact(source, len(expected))
        if len(got) < len(expected):
            raise TamperError(
                f"{label} is truncated: header has {len(got)} of {len(expected)} bytes"
            )
        if not hmac.compare_digest(got, expected):
            raise TamperError(
                f"{label} header failed authentication: file corrupted or tampered with"
            )
        self._ahead = _read_exact(source, chunk_size + TAG_SIZE)

    @property
    def plaintext_bytes(self) -> int:
        """Authenticated plaintext bytes decrypted so far."""
        return self._plaintext_bytes

    def _open(self, ct: bytes, counter: int, last: bool) -> int | None:
        out = memoryview(self._plain)[: len(ct) - TAG_SIZE]
        try:
            return self._aead.decrypt_into(chunk_nonce(counter, last), ct, None, out)
        except InvalidTag:
            return None

    def _next_chunk(self) -> bool:
        """Decrypt the next chunk into the plaintext buffer; False at the authenticated end."""
        if self._done:
            return False
        full = self._chunk_size + TAG_SIZE
        ct = self._ahead
        i = self._counter
        if len(ct) == full:
            self._ahead = _read_exact(self._source, full)
            last = not self._ahead
        else:
            self._ahead = b""
            last = True
        if len(ct) < TAG_SIZE:
            # ct is empty only at chunk 0: a full chunk with nothing after it counts as the last.
            if not ct:
                raise TamperError(f"{self._label} is truncated: no chunk after the header")
            raise TamperError(f"{self._label} is truncated: chunk {i} has only {len(ct)} bytes")
        n = self._open(ct, i, last)
        if n is None:
            if last and len(ct) == full and self._open(ct, i, last=False) is not None:
                raise TamperError(
                    f"{self._label} is truncated: it ends after chunk {i} without a final chunk"
                )
            if not last and self._open(ct, i, last=True) is not None:
                raise TamperError(
                    f"{self._label} has data after its final chunk {i}: "
                    "file corrupted or tampered with"
                )
            raise TamperError(
                f"{self._label} chunk {i} failed authentication: file corrupted or tampered with"
            )
        if last and n == 0 and i > 0:
            # The writer only emits an empty final chunk for an empty stream.
            raise TamperError(
                f"{self._label} chunk {i} is an empty final chunk: file tampered with"
            )
        self._counter += 1
        self._plaintext_bytes += n
        self._view = memoryview(self._plain)[:n]
        self._done = last
        return True

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` authenticated plaintext bytes (all remaining if negative)."""
        if size < 0:
            parts = [bytes(self._view)]
            self._view = self._view[:0]
            while self._next_chunk():
                parts.append(bytes(self._view))
            self._view = self._view[:0]
            return b"".join(parts)
        while not self._view:
            if not self._next_chunk():
                return b""
        out = bytes(self._view[:size])
        self._view = self._view[size:]
        return out

    def chunks(self) -> Iterator[memoryview]:
        """Yield each remaining authenticated chunk's plaintext (valid until the next step)."""
        if self._view:
            yield self._view
            self._view = self._view[:0]
        while self._next_chunk():
            yield self._view
        self._view = self._view[:0]


@dataclass(frozen=True)
class StreamScan:
    """What authenticates in a possibly unfinished stream (for crash recovery)."""

    header_ok: bool
    chunks: int
    """Leading chunks that authenticate, counting the final one if found."""
    final: bool
    """Whether the last authenticated chunk carries the last-chunk flag."""
    plaintext_bytes: int
    end_offset: int
    """Offset just past the last authenticated chunk."""
    last_chunk_offset: int
    """Offset of the last authenticated chunk (meaningless when ``chunks`` is 0)."""
    file_size: int
    sha256: str
    """Hex SHA-256 of the authenticated plaintext."""


def scan_stream(
    source: Source, key: bytes, header: bytes, *, cipher: str, chunk_size: int
) -> StreamScan:
    """Authenticate the longest prefix of ``source``, which may have been cut mid-write.

    Unlike :class:`StreamReader` this never raises for damage; it reports how far the stream
    is intact. ``source`` must be positioned at the start of the stream.
    """
    _check_chunk_size(chunk_size)
    aead = _payload_aead(key, header, cipher)
    expected = header + header_tag(key, header)
    got = _read_exact(source, len(expected))
    digest = hashlib.sha256()
    offset = len(got)
    if not hmac.compare_digest(got, expected):
        rest = len(source.read())
        return StreamScan(False, 0, False, 0, 0, 0, offset + rest, digest.hexdigest())
    full = chunk_size + TAG_SIZE
    plain = bytearray(chunk_size)
    counter = 0
    final = False
    plaintext_bytes = 0
    last_offset = 0
    consumed = offset
    while not final:
        ct = _read_exact(source, full)
        consumed += len(ct)
        if len(ct) < TAG_SIZE:
            break
        out = memoryview(plain)[: len(ct) - TAG_SIZE]
        n = _open_either(aead, ct, counter, out, may_continue=len(ct) == full)
        if n is None or (n[1] and n[0] == 0 and counter > 0):
            break
        size, final = n
        digest.update(out[:size])
        plaintext_bytes += size
        last_offset = offset
        offset += len(ct)
        counter += 1
    file_size = consumed + len(source.read())
    return StreamScan(
        True, counter, final, plaintext_bytes, offset, last_offset, file_size, digest.hexdigest()
    )


def _open_either(
    aead: AESGCM | ChaCha20Poly1305, ct: bytes, counter: int, out: memoryview, *, may_continue: bool
) -> tuple[int, bool] | None:
    """Decrypt ``ct`` as chunk ``counter``, non-final first when it is full-sized.

    Returns (plaintext length, is final), or None when neither flag authenticates.
    """
    for last in (False, True) if may_continue else (True,):
        try:
            return aead.decrypt_into(chunk_nonce(counter, last), ct, None, out), last
        except InvalidTag:
            continue
    return None


def seal_recovered(
    f: BinaryIO, key: bytes, header: bytes, scan: StreamScan, *, cipher: str
) -> None:
    """Make the authenticated prefix found by :func:`scan_stream` a complete stream, in place.

    Drops whatever follows the last authenticated chunk and, when that chunk is not final,
    re-seals it with the last-chunk flag. The nonce ``(n, last)`` is fresh: the writer only
    ever seals a final chunk at an index past every non-final one. ``f`` must be open for
    reading and writing; the caller fsyncs.
    """
    if not scan.header_ok or scan.chunks == 0:
        raise ValueError("nothing authenticates; the stream cannot be recovered")
    # Truncating first means a crash during the rewrite below loses at most that one chunk.
    f.truncate(scan.end_offset)
    if scan.final:
        return
    aead = _payload_aead(key, header, cipher)
    f.seek(scan.last_chunk_offset)
    ct = _read_exact(f, scan.end_offset - scan.last_chunk_offset)
    counter = scan.chunks - 1
    plaintext = aead.decrypt(chunk_nonce(counter, False), ct, None)
    f.seek(scan.last_chunk_offset)
    f.write(aead.encrypt(chunk_nonce(counter, True), plaintext, None))
    f.flush()
