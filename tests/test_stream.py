"""The STREAM chunker: round trips at every boundary, every tamper named, crash-cut recovery."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import stream
from agent.age.stream import chunk_nonce
from agent.errors import TamperError
from agent.stream import (
    AES_256_GCM,
    CHACHA20_POLY1305,
    TAG_SIZE,
    StreamReader,
    StreamWriter,
    ciphertext_size,
    cpu_has_aes,
    new_aead,
    resolve_cipher,
    scan_stream,
    seal_recovered,
    sealed_header_size,
)

N = 16  # small chunks keep the boundary cases cheap
KEY = bytes(range(32))
HEADER = b"test-header\x00v1"
CIPHERS = (AES_256_GCM, CHACHA20_POLY1305)


def plaintext(n: int, seed: int = 0) -> bytes:
    """Distinct, deterministic bytes (so a misplaced chunk can never compare equal)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def encrypt(
    data: bytes,
    *,
    key: bytes = KEY,
    header: bytes = HEADER,
    cipher: str = AES_256_GCM,
    chunk_size: int = N,
    write_size: int = 5,
) -> bytes:
    sink = io.BytesIO()
    writer = StreamWriter(sink, key, header, cipher=cipher, chunk_size=chunk_size)
    for i in range(0, len(data), write_size):
        writer.write(data[i : i + write_size])
    writer.finish()
    return sink.getvalue()


def reader_for(
    blob: bytes, *, key: bytes = KEY, cipher: str = AES_256_GCM, label: str = "clip X"
) -> StreamReader:
    return StreamReader(io.BytesIO(blob), key, HEADER, cipher=cipher, chunk_size=N, label=label)


def decrypt(blob: bytes, *, cipher: str = AES_256_GCM) -> bytes:
    return reader_for(blob, cipher=cipher).read()


def chunk_spans(blob: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every ciphertext chunk in a complete stream."""
    pos = sealed_header_size(HEADER)
    spans = []
    while pos < len(blob):
        length = min(N + TAG_SIZE, len(blob) - pos)
        spans.append((pos, length))
        pos += length
    return spans


# -- round trips ---------------------------------------------------------------------------

LENGTHS = (0, 1, N - 1, N, N + 1, 2 * N, 2 * N + 5, 5 * N + 3)
WRITE_SIZES = (1, 3, N - 1, N, N + 1, 2 * N + 1, 1000)


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("write_size", WRITE_SIZES)
def test_round_trip_at_chunk_boundaries(cipher: str, length: int, write_size: int) -> None:
    data = plaintext(length)
    blob = encrypt(data, cipher=cipher, write_size=write_size)
    # The layout does not depend on how the plaintext was cut into writes.
    assert blob == encrypt(data, cipher=cipher, write_size=7)
    assert len(blob) == ciphertext_size(HEADER, length, N)
    assert decrypt(blob, cipher=cipher) == data
    reader = reader_for(blob, cipher=cipher)
    pieces = []
    while piece := reader.read(write_size):
        assert len(piece) <= write_size
        pieces.append(piece)
    assert b"".join(pieces) == data
    assert reader.plaintext_bytes == length
    assert b"".join(bytes(c) for c in reader_for(blob, cipher=cipher).chunks()) == data


def test_chunk_count_and_final_flag_rule() -> None:
    # A stream of exactly k full chunks ends with a full final chunk, not an empty one.
    assert len(encrypt(plaintext(2 * N))) == sealed_header_size(HEADER) + 2 * (N + TAG_SIZE)
    # The empty stream is one empty final chunk.
    assert len(encrypt(b"")) == sealed_header_size(HEADER) + TAG_SIZE


def test_writer_emits_chunks_as_soon_as_they_are_known_not_final() -> None:
    sink = io.BytesIO()
    writer = StreamWriter(sink, KEY, HEADER, cipher=AES_256_GCM, chunk_size=N)
    writer.write(plaintext(N))
    assert writer.chunks_written == 0  # might still be the final chunk
    writer.write(b"x")
    assert writer.chunks_written == 1
    assert len(sink.getvalue()) == sealed_header_size(HEADER) + N + TAG_SIZE
    writer.write(plaintext(10 * N))
    assert writer.chunks_written == 11  # 11N + 1 bytes: only the last byte is held back
    assert writer.finish() == 11 * N + 1
    assert writer.finish() == 11 * N + 1  # idempotent
    with pytest.raises(ValueError, match="finished"):
        writer.write(b"more")


def test_writer_accepts_memoryviews_and_bytearrays() -> None:
    data = plaintext(3 * N + 2)
    sink = io.BytesIO()
    writer = StreamWriter(sink, KEY, HEADER, cipher=AES_256_GCM, chunk_size=N)
    writer.write(memoryview(data)[:20])
    writer.write(bytearray(data[20:]))
    writer.finish()
    assert sink.getvalue() == encrypt(data)


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=6 * N),
    cuts=st.lists(st.integers(min_value=0, max_value=3 * N), max_size=12),
    reads=st.integers(min_value=1, max_value=3 * N),
)
def test_round_trip_any_write_pattern(data: bytes, cuts: list[int], reads: int) -> None:
    sink = io.BytesIO()
    writer = StreamWriter(sink, KEY, HEADER, cipher=CHACHA20_POLY1305, chunk_size=N)
    pos = 0
    for cut in cuts:
        writer.write(data[pos : pos + cut])
        pos = min(len(data), pos + cut)
    writer.write(data[pos:])
    writer.finish()
    blob = sink.getvalue()
    assert blob == encrypt(data, cipher=CHACHA20_POLY1305)
    reader = reader_for(blob, cipher=CHACHA20_POLY1305)
    out = bytearray()
    while piece := reader.read(reads):
        out += piece
    assert out == data


# -- tampering -----------------------------------------------------------------------------


def read_until_error(blob: bytes, original: bytes) -> str:
    """Read in small pieces; everything returned before the error must be authentic."""
    got = bytearray()
    with pytest.raises(TamperError) as excinfo:
        reader = reader_for(blob)
        while piece := reader.read(7):
            got += piece
    assert original.startswith(bytes(got)), "unauthenticated plaintext was returned"
    return str(excinfo.value)


@pytest.fixture
def original() -> bytes:
    return plaintext(4 * N + 5)  # chunks 0-3 full, chunk 4 short and final


@pytest.fixture
def blob(original: bytes) -> bytes:
    return encrypt(original)


@pytest.mark.parametrize("offset", [0, 5, len(HEADER), len(HEADER) + 31])
def test_header_bit_flip_is_named(blob: bytes, original: bytes, offset: int) -> None:
    bad = bytearray(blob)
    bad[offset] ^= 0x01
    assert read_until_error(bytes(bad), original) == (
        "clip X header failed authentication: file corrupted or tampered with"
    )


@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("where", ["first", "middle", "tag"])
def test_chunk_bit_flip_names_the_chunk(
    blob: bytes, original: bytes, index: int, where: str
) -> None:
    start, length = chunk_spans(blob)[index]
    pos = {"first": start, "middle": start + length // 2, "tag": start + length - 1}[where]
    bad = bytearray(blob)
    bad[pos] ^= 0x80
    message = read_until_error(bytes(bad), original)
    assert message == f"clip X chunk {index} failed authentication: file corrupted or tampered with"


@pytest.mark.parametrize("keep_chunks", [1, 2, 3, 4])
def test_truncation_at_a_chunk_boundary_is_named(
    blob: bytes, original: bytes, keep_chunks: int
) -> None:
    start, _ = chunk_spans(blob)[keep_chunks]
    message = read_until_error(blob[:start], original)
    assert message == (
        f"clip X is truncated: it ends after chunk {keep_chunks - 1} without a final chunk"
    )


def test_truncation_right_after_the_header_is_named(blob: bytes, original: bytes) -> None:
    message = read_until_error(blob[: sealed_header_size(HEADER)], original)
    assert message == "clip X is truncated: no chunk after the header"


def test_truncation_inside_the_header_is_named(blob: bytes, original: bytes) -> None:
    message = read_until_error(blob[:10], original)
    assert message == f"clip X is truncated: header has 10 of {sealed_header_size(HEADER)} bytes"


@pytest.mark.parametrize("cut", [1, TAG_SIZE - 1, TAG_SIZE, N])
def test_truncation_inside_a_chunk_is_rejected(blob: bytes, original: bytes, cut: int) -> None:
    start, _ = chunk_spans(blob)[2]
    message = read_until_error(blob[: start + cut], original)
    if cut < TAG_SIZE:
        assert message == f"clip X is truncated: chunk 2 has only {cut} bytes"
    else:
        assert message.startswith("clip X chunk 2 failed authentication")


def test_reordered_chunks_fail(blob: bytes, original: bytes) -> None:
    spans = chunk_spans(blob)
    (a0, al), (b0, bl) = spans[1], spans[2]
    swapped = blob[:a0] + blob[b0 : b0 + bl] + blob[a0 : a0 + al] + blob[b0 + bl :]
    assert read_until_error(swapped, original).startswith("clip X chunk 1 failed authentication")


def test_duplicated_chunk_fails(blob: bytes, original: bytes) -> None:
    s, length = chunk_spans(blob)[1]
    dup = blob[: s + length] + blob[s : s + length] + blob[s + length :]
    assert read_until_error(dup, original).startswith("clip X chunk 2 failed authentication")


def test_dropped_middle_chunk_fails(blob: bytes, original: bytes) -> None:
    s, length = chunk_spans(blob)[1]
    assert read_until_error(blob[:s] + blob[s + length :], original).startswith(
        "clip X chunk 1 failed authentication"
    )


def test_data_after_a_full_final_chunk_is_named() -> None:
    original = plaintext(3 * N)
    blob = encrypt(original)
    s, length = chunk_spans(blob)[-1]
    message = read_until_error(blob + blob[s : s + length], original)
    assert message == ("clip X has data after its final chunk 2: file corrupted or tampered with")


def test_appended_bytes_after_a_short_final_chunk_fail(blob: bytes, original: bytes) -> None:
    assert read_until_error(blob + b"\x00" * 40, original).startswith(
        "clip X chunk 4 failed authentication"
    )


def test_chunk_from_another_stream_fails(blob: bytes, original: bytes) -> None:
    other = encrypt(original, key=os.urandom(32))
    s, length = chunk_spans(blob)[3]
    mixed = blob[:s] + other[s : s + length] + blob[s + length :]
    assert read_until_error(mixed, original).startswith("clip X chunk 3 failed authentication")


def test_chunk_from_a_stream_with_another_header_fails(blob: bytes, original: bytes) -> None:
    # Same key, different header: the payload key is bound to the header.
    sink = io.BytesIO()
    writer = StreamWriter(sink, KEY, b"other-header!!", cipher=AES_256_GCM, chunk_size=N)
    writer.write(original)
    writer.finish()
    other = sink.getvalue()
    shift = len(b"other-header!!") - len(HEADER)
    s, length = chunk_spans(blob)[0]
    mixed = blob[:s] + other[s + shift : s + shift + length] + blob[s + length :]
    assert read_until_error(mixed, original).startswith("clip X chunk 0 failed authentication")


def test_whole_stream_under_another_key_fails_at_the_header(original: bytes) -> None:
    other = encrypt(original, key=os.urandom(32))
    assert read_until_error(other, original) == (
        "clip X header failed authentication: file corrupted or tampered with"
    )


def test_wrong_cipher_fails(blob: bytes) -> None:
    with pytest.raises(TamperError, match="chunk 0 failed authentication"):
        decrypt(blob, cipher=CHACHA20_POLY1305)


def test_empty_final_chunk_after_data_is_rejected() -> None:
    # Only a key holder could make this; the writer never does, so the reader refuses it.
    sink = io.BytesIO()
    writer = StreamWriter(sink, KEY, HEADER, cipher=AES_256_GCM, chunk_size=N)
    writer.write(plaintext(N))
    writer.write(b"y")  # forces chunk 0 out as non-final
    blob = sink.getvalue()
    aead = stream._payload_aead(KEY, HEADER, AES_256_GCM)
    forged = blob + aead.encrypt(chunk_nonce(1, True), b"", None)
    with pytest.raises(TamperError, match="chunk 1 is an empty final chunk"):
        decrypt(forged)


# -- crash recovery ------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", CIPHERS)
def test_scan_and_reseal_at_every_cut(cipher: str) -> None:
    """Cut an unfinished stream at every byte; what survives is an authenticated prefix."""
    data = plaintext(3 * N + 4)
    sink = io.BytesIO()
    writer = StreamWriter(sink, KEY, HEADER, cipher=cipher, chunk_size=N)
    writer.write(data)
    unfinished = sink.getvalue()  # chunks 0-2 sealed as non-final, 4 bytes still pending
    writer.finish()
    finished = sink.getvalue()
    hs = sealed_header_size(HEADER)
    for blob in (unfinished, finished):
        for cut in range(len(blob) + 1):
            f = io.BytesIO(blob[:cut])
            scan = scan_stream(f, KEY, HEADER, cipher=cipher, chunk_size=N)
            assert scan.file_size == cut
            complete = max(0, (cut - hs) // (N + TAG_SIZE)) if cut >= hs else 0
            if cut < hs:
                assert not scan.header_ok and scan.chunks == 0
                continue
            assert scan.header_ok
            if blob is finished and cut == len(finished):
                assert scan.final and scan.chunks == 4 and scan.plaintext_bytes == len(data)
            else:
                assert not scan.final and scan.chunks == min(complete, 3)
            if scan.chunks == 0:
                with pytest.raises(ValueError, match="nothing authenticates"):
                    seal_recovered(f, KEY, HEADER, scan, cipher=cipher)
                continue
            kept = data[: scan.plaintext_bytes]
            assert scan.sha256 == hashlib.sha256(kept).hexdigest()
            seal_recovered(f, KEY, HEADER, scan, cipher=cipher)
            sealed = f.getvalue()
            assert len(sealed) == ciphertext_size(HEADER, len(kept), N)
            assert decrypt(sealed, cipher=cipher) == kept
            # Sealing again (a crash during recovery, then recovery again) changes nothing.
            f2 = io.BytesIO(sealed)
            again = scan_stream(f2, KEY, HEADER, cipher=cipher, chunk_size=N)
            assert again.final and again.chunks == scan.chunks
            seal_recovered(f2, KEY, HEADER, again, cipher=cipher)
            assert f2.getvalue() == sealed


def test_scan_drops_trailing_garbage_after_a_full_final_chunk() -> None:
    data = plaintext(3 * N)
    blob = encrypt(data)
    f = io.BytesIO(blob + b"garbage")
    scan = scan_stream(f, KEY, HEADER, cipher=AES_256_GCM, chunk_size=N)
    assert scan.final and scan.end_offset == len(blob) and scan.file_size == len(blob) + 7
    seal_recovered(f, KEY, HEADER, scan, cipher=AES_256_GCM)
    assert f.getvalue() == blob


def test_scan_stops_at_a_corrupted_chunk() -> None:
    data = plaintext(4 * N)
    bad = bytearray(encrypt(data))
    s, _ = chunk_spans(bytes(bad))[2]
    bad[s] ^= 1
    scan = scan_stream(io.BytesIO(bytes(bad)), KEY, HEADER, cipher=AES_256_GCM, chunk_size=N)
    assert scan.chunks == 2 and not scan.final and scan.plaintext_bytes == 2 * N


# -- cipher choice and parameters ----------------------------------------------------------

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse sse2 ssse3 pclmulqdq aes avx avx2 sha_ni
"""
X86_NO_AES = "processor\t: 0\nflags\t\t: fpu vme de pse sse2 ssse3 avx\n"
ARM64_AES = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid\n"
RPI4 = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


def test_cpu_aes_detection() -> None:
    assert cpu_has_aes(X86_CPUINFO)
    assert cpu_has_aes(ARM64_AES)
    assert not cpu_has_aes(X86_NO_AES)
    assert not cpu_has_aes(RPI4)
    assert not cpu_has_aes("model name\t: aes-looking name aes\n")  # not a flags line
    assert not cpu_has_aes("")


def test_resolve_cipher() -> None:
    assert resolve_cipher("auto", X86_CPUINFO) == AES_256_GCM
    assert resolve_cipher("auto", RPI4) == CHACHA20_POLY1305
    assert resolve_cipher("chacha20-poly1305", X86_CPUINFO) == CHACHA20_POLY1305
    assert resolve_cipher("aes-256-gcm", RPI4) == AES_256_GCM
    with pytest.raises(ValueError, match="unknown cipher"):
        resolve_cipher("rot13", RPI4)


def test_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        new_aead(AES_256_GCM, b"short")
    with pytest.raises(ValueError, match="unknown cipher"):
        new_aead("des", KEY)
    with pytest.raises(ValueError, match="chunk size"):
        StreamWriter(io.BytesIO(), KEY, HEADER, cipher=AES_256_GCM, chunk_size=0)
    assert chunk_nonce(1, True) == b"\x00" * 10 + b"\x01\x01"
    assert chunk_nonce(256, False) == b"\x00" * 9 + b"\x01\x00\x00"
