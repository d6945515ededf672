"""Fuzzing the vault reader with damaged real clip files: bit flips, truncations, splices,
chunk swaps between two clips, reordered, dropped and duplicated chunks, appended bytes.

The reader must raise TamperError (or another VaultError), never hand out plaintext that did
not authenticate: whatever it returned before the error is a prefix of the true plaintext, and
an undamaged file reads back whole.

Examples per test come from a Hypothesis profile: ``vault-ci`` (3 000, chosen when CI=true) or
``vault-dev`` (150) otherwise; ``bench/fuzz.py`` runs the same test for minutes.
"""

from __future__ import annotations

import functools
import os
import random
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import stream
from agent.errors import TamperError, VaultError
from agent.vault import Vault, build_header

settings.register_profile(
    "vault-ci", max_examples=3_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("vault-dev", max_examples=150, deadline=None)
PROFILE = settings.get_profile("vault-ci" if os.environ.get("CI") == "true" else "vault-dev")

CHUNK = 64
# Two clips of one size: splices and chunk swaps between them keep the file size the index
# records, so they reach the chunk authentication instead of the size check.
PLAIN_SIZE = 40 * CHUNK + 17
CIPHERS = (stream.AES_256_GCM, stream.CHACHA20_POLY1305)
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Clip:
    """One stored clip: its id, true plaintext, file and pristine ciphertext."""

    id: str
    plaintext: bytes
    path: Path
    ciphertext: bytes


@dataclass(frozen=True)
class Corpus:
    """A vault holding clips ``a`` and ``b`` for one cipher."""

    vault: Vault
    a: Clip
    b: Clip
    header_size: int


def _store(vault: Vault, start: datetime, plaintext: bytes) -> Clip:
    writer = vault.create_clip(start, "video/x-matroska")
    for i in range(0, len(plaintext), 100):  # writes that straddle chunk boundaries
        writer.write(plaintext[i : i + 100])
    info = writer.finish(start + timedelta(seconds=10), frames=10)
    path = vault.dir / f"{info.id}.clip"
    return Clip(info.id, plaintext, path, path.read_bytes())


@functools.cache
def corpus(cipher: str) -> Corpus:
    """The clips for ``cipher``, made once per process (the directory lives until exit)."""
    root = Path(tempfile.mkdtemp(prefix="vault-fuzz-"))
    rng = random.Random(cipher)
    vault = Vault(root, rng.randbytes(32), cipher=cipher, chunk_size=CHUNK)
    a = _store(vault, T0, rng.randbytes(PLAIN_SIZE))
    b = _store(vault, T0 + timedelta(minutes=1), rng.randbytes(PLAIN_SIZE))
    header = build_header(a.id, vault.cipher, CHUNK)
    return Corpus(vault, a, b, stream.sealed_header_size(header))


def chunks(c: Corpus, data: bytes) -> tuple[bytes, list[bytes]]:
    """The sealed header and the sealed chunks of a clip file."""
    size = CHUNK + stream.TAG_SIZE
    body = data[c.header_size :]
    return data[: c.header_size], [body[i : i + size] for i in range(0, len(body), size)]


KINDS = (
    "flip", "truncate", "splice", "swap_chunk", "reorder", "duplicate", "drop", "append",
    "header_from_b", "file_from_b",
)
Op = tuple[str, int, int, bytes]
"""A damage: its kind, two numbers (positions, chunk indexes, a bit) and bytes to append."""
OPS = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.binary(min_size=1, max_size=100),
)


def mutate(c: Corpus, data: bytes, op: Op) -> bytes:
    """Apply one damage ``op`` to the bytes of clip a (b is the donor)."""
    kind, x, y, blob = op
    donor = c.b.ciphertext
    if not data:
        return blob if kind == "append" else data
    if kind == "flip":
        out = bytearray(data)
        out[x % len(data)] ^= 1 << (y % 8)
        return bytes(out)
    if kind == "truncate":
        return data[: x % len(data)]
    if kind == "splice":
        return data[: x % len(data)] + donor[x % len(data) :]
    if kind == "append":
        return data + blob
    if kind == "file_from_b":
        return donor
    header, parts = chunks(c, data)
    if kind == "header_from_b":
        return donor[: c.header_size] + b"".join(parts)
    if not parts:
        return data
    i = x % len(parts)
    if kind == "swap_chunk":
        theirs = chunks(c, donor)[1]
        parts[i] = theirs[y % len(theirs)]
    elif kind == "reorder":
        j = y % len(parts)
        parts[i], parts[j] = parts[j], parts[i]
    elif kind == "duplicate":
        parts.insert(i, parts[i])
    elif kind == "drop":
        del parts[i]
    return header + b"".join(parts)


def read_damaged(c: Corpus, damaged: bytes, read_size: int, verify: bool) -> tuple[bytes, bool]:
    """Put ``damaged`` in place of clip a's file and read it: (plaintext returned, whether the
    reader raised). Any exception other than VaultError propagates (and fails the test)."""
    got = bytearray()
    c.a.path.write_bytes(damaged)
    try:
        with c.vault.open_clip(c.a.id, verify_sha256=verify) as reader:
            while data := reader.read(read_size):
                got += data
    except TamperError:
        return bytes(got), True
    except VaultError as exc:
        assert str(exc), "a VaultError must say what happened"
        return bytes(got), True
    finally:
        c.a.path.write_bytes(c.a.ciphertext)
    return bytes(got), False


@settings(PROFILE)
@given(
    cipher=st.sampled_from(CIPHERS),
    ops=st.lists(OPS, min_size=1, max_size=3),
    read_size=st.integers(1, 3 * CHUNK) | st.just(-1),
    verify=st.booleans(),
)
def test_damaged_clips_never_yield_unauthenticated_plaintext(
    cipher: str, ops: list[Op], read_size: int, verify: bool
) -> None:
    c = corpus(cipher)
    damaged = c.a.ciphertext
    for op in ops:
        damaged = mutate(c, damaged, op)
    got, failed = read_damaged(c, damaged, read_size, verify)
    assert c.a.plaintext.startswith(got), "the reader returned bytes that are not the clip's"
    if damaged == c.a.ciphertext:
        assert (got, failed) == (c.a.plaintext, False)
    else:
        assert failed, f"a damaged file read without error ({ops})"


def test_pristine_clips_read_back_whole() -> None:
    for cipher in CIPHERS:
        c = corpus(cipher)
        for size in (1, CHUNK, 1000, -1):
            assert read_damaged(c, c.a.ciphertext, size, True) == (c.a.plaintext, False)
