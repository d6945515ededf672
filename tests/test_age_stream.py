"""The age STREAM payload layer on its own, in the style of age's ``internal/stream`` tests.

Plaintext lengths around the chunk size (0, n-1, n, n+1, 2n, 2n+k) are crossed with the sizes
of the writes that produce them and of the pieces the reader is fed: the sealed payload must
not depend on how it was written, must have exactly the chunks age prescribes, and must come
back unchanged however it is cut. The whole file (header and payload) goes through stock age
and pyrage for every write size.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pyrage
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from pyrage import x25519

from agent import age
from agent.age.stream import (
    PAYLOAD_CHUNK,
    SEALED_CHUNK,
    StreamReader,
    StreamWriter,
    chunk_nonce,
)
from agent.age.x25519 import recipient_key
from agent.errors import ReceiveError

N = PAYLOAD_CHUNK
LENGTHS = [0, 1, N - 1, N, N + 1, 2 * N, 2 * N + 1000]
WRITE_SIZES = [1, 512, N - 1, N, N + 1, 3 * N]
FEED_SIZES = [1, 1000, SEALED_CHUNK - 1, SEALED_CHUNK, SEALED_CHUNK + 1, 4 * SEALED_CHUNK]
AGE = shutil.which("age")


def aead() -> ChaCha20Poly1305:
    return ChaCha20Poly1305(bytes(range(32)))


def seal(data: bytes, write_size: int) -> list[bytes]:
    chunks: list[bytes] = []
    writer = StreamWriter(aead(), chunks.append)
    for at in range(0, len(data), write_size):
        writer.write(data[at : at + write_size])
    writer.close()
    return chunks


def open_payload(payload: bytes, feed_size: int) -> bytes:
    reader = StreamReader(aead())
    out: list[bytes] = []
    for at in range(0, len(payload), feed_size):
        out += reader.feed(payload[at : at + feed_size])
    out.append(reader.finish())
    return b"".join(out)


def test_every_length_and_write_size_gives_the_same_chunks() -> None:
    for length in LENGTHS:
        data = random.Random(length).randbytes(length)
        expected = max(1, -(-length // N))
        first = seal(data, N)
        assert len(first) == expected, length
        assert all(len(c) == SEALED_CHUNK for c in first[:-1]), length
        assert len(first[-1]) == length - (expected - 1) * N + 16, length
        # Each chunk opens under its own counter, and only the last one with the last flag.
        for i, chunk in enumerate(first):
            last = i == expected - 1
            assert aead().decrypt(chunk_nonce(i, last), chunk, None) == data[i * N : (i + 1) * N]
            with pytest.raises(InvalidTag):
                aead().decrypt(chunk_nonce(i, not last), chunk, None)
        for write_size in WRITE_SIZES:
            assert seal(data, write_size) == first, (length, write_size)


def test_a_mutable_buffer_may_be_reused_after_each_write() -> None:
    data = random.Random(9).randbytes(2 * N + 5)
    for write_size in (N, N + 1, 2 * N + 5):
        chunks: list[bytes] = []
        writer = StreamWriter(aead(), chunks.append)
        for at in range(0, len(data), write_size):
            buffer = bytearray(data[at : at + write_size])
            writer.write(buffer)
            buffer[:] = bytes(len(buffer))
        writer.close()
        assert chunks == seal(data, write_size), write_size


def test_reader_gets_every_length_back_however_it_is_fed() -> None:
    for length in LENGTHS:
        data = random.Random(length).randbytes(length)
        payload = b"".join(seal(data, N))
        for feed_size in FEED_SIZES:
            assert open_payload(payload, feed_size) == data, (length, feed_size)


def test_reader_refuses_reordered_dropped_and_added_chunks() -> None:
    data = random.Random(7).randbytes(3 * N + 10)
    chunks = seal(data, N)
    cases = {
        "swapped": (chunks[1] + chunks[0] + chunks[2] + chunks[3], "chunk 0 failed"),
        "duplicated": (chunks[0] + chunks[0] + chunks[2] + chunks[3], "chunk 1 failed"),
        "middle dropped": (chunks[0] + chunks[2] + chunks[3], "chunk 1 failed"),
        "last dropped": (b"".join(chunks[:3]), "without a final chunk"),
        "data after the end": (b"".join(chunks) + b"x", "chunk 3 failed"),
        "tag cut short": (b"".join(chunks)[:-1], "chunk 3 failed"),
        "only a tag's worth missing": (b"".join(chunks[:3]) + b"x" * 15, "inside its last"),
        "nothing": (b"", "has no payload"),
    }
    for name, (payload, message) in cases.items():
        for feed_size in (1000, SEALED_CHUNK + 1):
            with pytest.raises(ReceiveError, match=message):
                open_payload(payload, feed_size)
        assert name


def test_an_empty_final_chunk_after_a_full_one_is_refused() -> None:
    data = random.Random(8).randbytes(N)
    forged = aead().encrypt(chunk_nonce(0, False), data, None) + aead().encrypt(
        chunk_nonce(1, True), b"", None
    )
    with pytest.raises(ReceiveError, match="empty final chunk"):
        open_payload(forged, SEALED_CHUNK)


def test_writer_refuses_writes_after_close_and_closes_once() -> None:
    chunks: list[bytes] = []
    writer = StreamWriter(aead(), chunks.append)
    writer.write(b"abc")
    writer.close()
    writer.close()
    assert len(chunks) == 1
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"more")
    assert open_payload(chunks[0], 100) == b"abc"


@pytest.mark.skipif(AGE is None, reason="the age CLI is needed")
def test_whole_files_written_in_any_step_decrypt_with_stock_age_and_pyrage(
    tmp_path: Path,
) -> None:
    assert AGE is not None
    identity = x25519.Identity.generate()
    id_file = tmp_path / "identity.txt"
    id_file.write_text(str(identity) + "\n")
    id_file.chmod(0o600)
    key = recipient_key(identity.to_public())
    for length in LENGTHS:
        data = random.Random(length).randbytes(length)
        for write_size in (512, N, N + 1):
            parts: list[bytes] = []
            writer = age.encrypt(key, parts.append)
            for at in range(0, length, write_size):
                writer.write(data[at : at + write_size])
            writer.close()
            blob = b"".join(parts)
            assert pyrage.decrypt(blob, [identity]) == data, (length, write_size)
            src = tmp_path / "file.age"
            src.write_bytes(blob)
            done = subprocess.run(
                [AGE, "-d", "-i", str(id_file), str(src)],
                capture_output=True,
                check=True,
                timeout=60,
            )
            assert done.stdout == data, (length, write_size)
