"""Streaming age encryption of one clip into fixed-size chunks, and the age v1 format pieces.

The device writes age v1 files (https://age-encryption.org/v1) with one X25519 recipient stanza,
which the stock ``age -d`` and every other age implementation decrypt. The format is written
here with pyca/cryptography's primitives rather than through pyrage because pyrage's streaming
API pulls plaintext through a Python callback every 8 KiB and holds the GIL for the whole file,
so nothing else in the agent (the vault's decryption, the MQTT network thread) can run while it
encrypts; cryptography releases the GIL inside each 64 KiB ChaCha20-Poly1305 call, and its
ChaCha20-Poly1305 is also the faster of the two. pyrage still validates the recipient string.

:func:`encrypt_to_chunks` reads the plaintext, hashes it, encrypts it and cuts the age file into
chunks of ``chunk_bytes`` that go to a sink (the publisher) as soon as each is full: at most one
MQTT chunk plus one age payload chunk is held at a time whatever the clip size, and no plaintext
is ever written anywhere.

The format, in short: a 16-byte random file key is wrapped for the recipient (ephemeral X25519,
HKDF-SHA-256 with label ``age-encryption.org/v1/X25519``, ChaCha20-Poly1305 under a zero nonce);
the text header ends with an HMAC-SHA-256 under ``HKDF(file key, info="header")``; the payload is
a 16-byte random nonce followed by the plaintext in 64 KiB ChaCha20-Poly1305 chunks under
``HKDF(file key, salt=nonce, info="payload")``, chunk nonces being an 11-byte big-endian counter
and a last-chunk flag byte.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pyrage
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pyrage import x25519

from agent.errors import DeliveryError

ChunkSink = Callable[[int, bytes], None]
"""Called with (seq, chunk) for each chunk of the age file, in order, 0-based."""

RandomBytes = Callable[[int], bytes]
"""Returns n cryptographically random bytes (``os.urandom``; injectable for tests)."""

AGE_VERSION_LINE = b"age-encryption.org/v1"
X25519_LABEL = b"age-encryption.org/v1/X25519"
FILE_KEY_BYTES = 16
PAYLOAD_NONCE_BYTES = 16
PAYLOAD_CHUNK = 64 * 1024
"""Plaintext bytes per age payload chunk; each is sealed with a 16-byte tag."""
TAG_BYTES = 16
SEALED_CHUNK = PAYLOAD_CHUNK + TAG_BYTES
STANZA_COLUMNS = 64
_READ_AHEAD = 4
"""Plaintext blocks read ahead of the encryption (64 KiB each)."""
_ZERO_NONCE = bytes(12)
_BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


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


# -- shared age v1 primitives (the requester's decryptor uses them too) --------------------------


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA-256 as age uses it (an empty salt means no salt)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)


def chunk_nonce(counter: int, last: bool) -> bytes:
    """The STREAM nonce of payload chunk ``counter``: 11-byte big-endian counter + last flag."""
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


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


def payload_aead(file_key: bytes, nonce: bytes) -> ChaCha20Poly1305:
    """The payload cipher for a file key and the payload's 16-byte nonce."""
    return ChaCha20Poly1305(hkdf_sha256(file_key, nonce, b"payload"))


def x25519_wrap_key(shared: bytes, share: bytes, recipient: bytes) -> ChaCha20Poly1305:
    """The cipher that wraps the file key in an X25519 stanza."""
    return ChaCha20Poly1305(hkdf_sha256(shared, share + recipient, X25519_LABEL))


def _bech32_polymod(values: list[int]) -> int:
    generator = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= generator[i] if (top >> i) & 1 else 0
    return chk


def bech32_decode(text: str, hrp: str) -> bytes:
    """The payload of a Bech32 string (BIP 173, no length limit, as age uses it).

    ``hrp`` is compared case-insensitively; mixed case, a bad checksum or padding that is not
    zero raise ValueError.
    """
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed case")
    text = text.lower()
    sep = text.rfind("1")
    if text[:sep] != hrp.lower() or len(text) - sep - 1 < 6:
        raise ValueError(f"not a {hrp} Bech32 string")
    try:
        data = [_BECH32_CHARSET.index(c) for c in text[sep + 1 :]]
    except ValueError:
        raise ValueError("character outside the Bech32 alphabet") from None
    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    if _bech32_polymod(expanded + data) != 1:
        raise ValueError("bad Bech32 checksum")
    acc = bits = 0
    out = bytearray()
    for v in data[:-6]:
        acc = acc << 5 | v
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append(acc >> bits & 0xFF)
    if bits >= 5 or acc & ((1 << bits) - 1):
        raise ValueError("non-zero Bech32 padding")
    return bytes(out)


# -- encryption --------------------------------------------------------------------------------


def parse_recipient(text: str) -> x25519.Recipient:
    """An age X25519 recipient from its ``age1...`` string; raises DeliveryError if malformed."""
    if not isinstance(text, str) or not text.startswith("age1"):
        raise DeliveryError(f"{text!r} is not an age X25519 recipient (age1...)")
    try:
        return x25519.Recipient.from_str(text)
    except pyrage.RecipientError as exc:
        raise DeliveryError(f"{text!r} is not a valid age X25519 recipient: {exc}") from None


def recipient_key(recipient: x25519.Recipient | str) -> bytes:
    """The 32-byte X25519 public key of an age recipient; raises DeliveryError if malformed."""
    rcpt = parse_recipient(recipient) if isinstance(recipient, str) else recipient
    try:
        key = bech32_decode(str(rcpt), "age")
    except ValueError as exc:
        raise DeliveryError(f"{str(rcpt)!r} is not a valid age X25519 recipient: {exc}") from None
    if len(key) != 32:
        raise DeliveryError(f"{str(rcpt)!r} does not hold a 32-byte X25519 key")
    return key


def age_header(recipient: bytes, file_key: bytes, randbytes: RandomBytes = os.urandom) -> bytes:
    """The text header of an age file whose file key is wrapped for one X25519 ``recipient``."""
    ephemeral = X25519PrivateKey.from_private_bytes(randbytes(32))
    share = ephemeral.public_key().public_bytes_raw()
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    except ValueError:
        # A low-order point gives an all-zero secret: the file key would be readable by anyone.
        raise DeliveryError("the age recipient is not a usable X25519 public key") from None
    body = x25519_wrap_key(shared, share, recipient).encrypt(_ZERO_NONCE, file_key, None)
    # The 32-byte share and body encode to 43 characters: one line each, under 64 columns.
    header = b"%s\n-> X25519 %s\n%s\n---" % (AGE_VERSION_LINE, b64_encode(share), b64_encode(body))
    return header + b" " + b64_encode(header_mac(file_key, header)) + b"\n"


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
    randbytes: RandomBytes = os.urandom,
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
    file_key = randbytes(FILE_KEY_BYTES)
    header = age_header(key, file_key, randbytes)
    nonce = randbytes(PAYLOAD_NONCE_BYTES)
    aead = payload_aead(file_key, nonce)
    out = _Chunker(chunk_bytes, sink)
    out.write(header + nonce)
    source = _ReadAhead(reader, _READ_AHEAD)
    try:
        counter = 0
        # A chunk is sealed as the last one only once the next block shows nothing follows: a
        # plaintext that fills its last chunk exactly still ends on a full chunk, as age wants.
        current = source.get()
        while True:
            following = source.get() if len(current) == PAYLOAD_CHUNK else b""
            last = not following
            out.write(aead.encrypt(chunk_nonce(counter, last), current, None))
            if last:
                break
            counter += 1
            current = following
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
