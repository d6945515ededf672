"""The age v1 format: the device's encoder against stock age and pyrage, the requester's decoder.

Every file the device writes is decrypted by the stock ``age`` CLI and by pyrage (rage); the
requester's streaming decryptor reads files written by both of them (rage adds random "grease"
stanzas) fed in arbitrary pieces, and refuses every kind of damage.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519

from agent.age import AgeDecryptor
from agent.age.bech32 import bech32_decode
from agent.age.format import b64_decode
from agent.age.primitives import payload_aead
from agent.age.stream import PAYLOAD_CHUNK, SEALED_CHUNK, chunk_nonce
from agent.age.x25519 import identity_key
from agent.errors import DeliveryError, ReceiveError
from agent.release.encrypt import encrypt_to_chunks

AGE = shutil.which("age")
SIZES = [0, 1, PAYLOAD_CHUNK - 1, PAYLOAD_CHUNK, PAYLOAD_CHUNK + 1, 2 * PAYLOAD_CHUNK, 200_000]
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def bech32_encode(hrp: str, data: bytes) -> str:
    """Reference BIP 173 encoder, to build recipients the device must refuse."""

    def polymod(values: list[int]) -> int:
        gen = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
        chk = 1
        for v in values:
            top = chk >> 25
            chk = (chk & 0x1FFFFFF) << 5 ^ v
            for i in range(5):
                chk ^= gen[i] if (top >> i) & 1 else 0
        return chk

    acc = bits = 0
    five: list[int] = []
    for byte in data:
        acc = acc << 8 | byte
        bits += 8
        while bits >= 5:
            bits -= 5
            five.append(acc >> bits & 31)
    if bits:
        five.append(acc << (5 - bits) & 31)
    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    pm = polymod(expanded + five + [0] * 6) ^ 1
    checksum = [(pm >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[v] for v in five + checksum)


def encrypt(data: bytes, recipient: x25519.Recipient, **kwargs: Callable[[int], bytes]) -> bytes:
    parts: list[bytes] = []
    encrypt_to_chunks(io.BytesIO(data), recipient, 4096, lambda _s, c: parts.append(c), **kwargs)
    return b"".join(parts)


def decrypt_in_pieces(blob: bytes, identity: x25519.Identity, seed: int) -> bytes:
    """Our streaming decryptor, fed the file in random-sized pieces."""
    rng = random.Random(seed)
    dec = AgeDecryptor(identity_key(identity))
    out: list[bytes] = []
    pos = 0
    while pos < len(blob):
        step = rng.choice([1, 7, 100, 4096, SEALED_CHUNK, SEALED_CHUNK + 1, 300_000])
        out += dec.feed(blob[pos : pos + step])
        pos += step
    out.append(dec.finish())
    return b"".join(out)


def counting_random(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


@pytest.fixture
def identity() -> x25519.Identity:
    return x25519.Identity.generate()


@pytest.mark.skipif(AGE is None, reason="the age CLI is needed")
def test_stock_age_and_pyrage_decrypt_every_chunk_boundary_case(
    tmp_path: Path, identity: x25519.Identity
) -> None:
    assert AGE is not None
    id_file = tmp_path / "identity.txt"
    id_file.write_text(str(identity) + "\n")
    id_file.chmod(0o600)
    for size in SIZES:
        data = random.Random(size).randbytes(size)
        blob = encrypt(data, identity.to_public())
        src = tmp_path / f"{size}.age"
        src.write_bytes(blob)
        done = subprocess.run(
            [AGE, "-d", "-i", str(id_file), str(src)], capture_output=True, check=True, timeout=60
        )
        assert done.stdout == data, size
        assert pyrage.decrypt(blob, [identity]) == data, size
        assert decrypt_in_pieces(blob, identity, size) == data, size
        # header, 16-byte nonce, then full sealed chunks and one final (non-empty unless empty)
        payload = len(blob) - blob.index(b"\n---") - len(b"\n--- ") - 43 - 1 - 16
        chunks = max(1, -(-size // PAYLOAD_CHUNK))
        assert payload == size + 16 * chunks


def test_header_is_age_v1_with_one_x25519_stanza(identity: x25519.Identity) -> None:
    blob = encrypt(b"hello", identity.to_public())
    lines = blob.split(b"\n")
    assert lines[0] == b"age-encryption.org/v1"
    assert lines[1].startswith(b"-> X25519 ") and len(b64_decode(lines[1][10:])) == 32
    assert len(b64_decode(lines[2])) == 32  # the wrapped 16-byte file key and its tag
    assert lines[3].startswith(b"--- ") and len(b64_decode(lines[3][4:])) == 32


def test_every_file_gets_fresh_keys_and_randomness_is_injectable(
    identity: x25519.Identity,
) -> None:
    data = random.Random(1).randbytes(100_000)
    a = encrypt(data, identity.to_public())
    b = encrypt(data, identity.to_public())
    # new ephemeral share, wrapped key, MAC and payload nonce: no byte of the payload repeats
    assert a.split(b"\n")[1] != b.split(b"\n")[1]
    assert a[-1000:] != b[-1000:]
    fixed_a = encrypt(data, identity.to_public(), randbytes=counting_random(5))
    fixed_b = encrypt(data, identity.to_public(), randbytes=counting_random(5))
    assert fixed_a == fixed_b
    assert pyrage.decrypt(fixed_a, [identity]) == data


def test_low_order_recipient_is_refused_before_anything_is_sent() -> None:
    sent: list[bytes] = []
    zero = bech32_encode("age", bytes(32))
    with pytest.raises(DeliveryError, match="recipient"):
        encrypt_to_chunks(io.BytesIO(b"secret"), zero, 4096, lambda _s, c: sent.append(c))
    assert sent == []


def test_bech32_checks(identity: x25519.Identity) -> None:
    text = str(identity.to_public())
    key = bech32_decode(text, "age")
    assert bech32_encode("age", key) == text
    assert bech32_decode(text.upper(), "age") == key
    # the identity's public key is the recipient pyrage derives
    public = identity_key(identity).public_key().public_bytes_raw()
    assert public == key
    broken = text[:-1] + ("q" if text[-1] != "q" else "p")
    for bad, why in [
        (broken, "checksum"),
        (text[:6] + text[6:].upper(), "mixed case"),
        ("age1" + "b" * 58, "alphabet"),
        (text, "not a"),
    ]:
        with pytest.raises(ValueError, match=why):
            bech32_decode(bad, "age" if why != "not a" else "other")


@pytest.mark.skipif(AGE is None, reason="the age CLI is needed")
def test_decryptor_reads_stock_age_and_rage_files(
    tmp_path: Path, identity: x25519.Identity
) -> None:
    assert AGE is not None
    for size in SIZES:
        data = random.Random(size).randbytes(size)
        # rage adds a random grease stanza with a multi-line body to every file
        for n in range(3):
            blob = pyrage.encrypt(data, [identity.to_public()])
            assert decrypt_in_pieces(blob, identity, size + n) == data
        src = tmp_path / "plain"
        src.write_bytes(data)
        done = subprocess.run(
            [AGE, "-e", "-r", str(identity.to_public()), str(src)],
            capture_output=True,
            check=True,
            timeout=60,
        )
        assert decrypt_in_pieces(done.stdout, identity, size) == data
    # a second recipient's stanza is skipped
    other = x25519.Identity.generate()
    blob = pyrage.encrypt(b"both", [other.to_public(), identity.to_public()])
    assert decrypt_in_pieces(blob, identity, 0) == b"both"


def forged_with_empty_final_chunk(identity: x25519.Identity) -> bytes:
    """A full last chunk sealed as non-final, then an empty final chunk: invalid in age."""
    data = random.Random(2).randbytes(PAYLOAD_CHUNK)
    rand = counting_random(9)
    blob = encrypt(data, identity.to_public(), randbytes=rand)
    replay = counting_random(9)
    file_key = replay(16)
    replay(32)  # the ephemeral key
    nonce = replay(16)
    aead = payload_aead(file_key, nonce)
    head = blob[: len(blob) - SEALED_CHUNK]
    return (
        head
        + aead.encrypt(chunk_nonce(0, False), data, None)
        + aead.encrypt(chunk_nonce(1, True), b"", None)
    )


def damaged(identity: x25519.Identity) -> dict[str, tuple[bytes, str]]:
    data = random.Random(3).randbytes(3 * PAYLOAD_CHUNK)
    blob = encrypt(data, identity.to_public())
    start = blob.index(b"\n---") + 49 + 16  # the payload's first chunk
    mac_at = blob.index(b"\n---") + 6

    def flip(at: int) -> bytes:
        return blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :]

    return {
        "final chunk dropped": (blob[:-SEALED_CHUNK], "without a final chunk"),
        "final chunk cut short": (blob[:-100], "failed authentication"),
        "data after the end": (blob + b"x" * 20, "failed authentication"),
        "whole chunk appended": (blob + blob[-SEALED_CHUNK:], "failed authentication"),
        "payload bit flipped": (flip(start + 10), "payload chunk 0 failed authentication"),
        "last chunk bit flipped": (flip(len(blob) - 5), "chunk 2 failed authentication"),
        "header MAC changed": (
            blob[:mac_at]
            + (b"B" if blob[mac_at : mac_at + 1] != b"B" else b"C")
            + blob[mac_at + 1 :],
            "header failed authentication",
        ),
        "wrapped key flipped": (flip(blob.index(b"\n", 30) + 3), "for this identity|base64"),
        "header only": (blob[: blob.index(b"\n---") + 49], "truncated inside its header"),
        "no payload": (blob[:start], "has no payload"),
        "not age": (b"PK\x03\x04" + blob, "not an age v1 file"),
        "empty final chunk": (forged_with_empty_final_chunk(identity), "empty final chunk"),
    }


def test_decryptor_refuses_every_kind_of_damage(identity: x25519.Identity) -> None:
    for name, (blob, message) in damaged(identity).items():
        with pytest.raises(ReceiveError, match=message):
            decrypt_in_pieces(blob, identity, len(blob))
        # rage refuses the same files: the two implementations agree on what is valid
        with pytest.raises(pyrage.DecryptError):
            pyrage.decrypt(blob, [identity])
        assert name


def test_decryptor_refuses_a_file_for_someone_else(identity: x25519.Identity) -> None:
    blob = encrypt(b"not yours", x25519.Identity.generate().to_public())
    with pytest.raises(ReceiveError, match=r"no recipient stanza .* is for this identity"):
        decrypt_in_pieces(blob, identity, 0)


def test_decryptor_refuses_malformed_headers(identity: x25519.Identity) -> None:
    good = encrypt(b"x", identity.to_public())
    lines = good.split(b"\n")
    cases = {
        b"age-encryption.org/v2\n" + b"\n".join(lines[1:]): "not an age v1 file",
        b"\n".join([lines[0], b"-> X25519", *lines[2:]]): "malformed X25519 stanza",
        b"\n".join([lines[0], b"-> X25519 " + lines[1][10:] + b"=", *lines[2:]]): "malformed",
        b"\n".join([lines[0], b"junk", *lines[1:]]): "malformed line",
        b"\n".join([lines[0], lines[3], *lines[4:]]): "no recipient stanza",
        b"\n".join([lines[0], lines[1], b"A" * 65, *lines[3:]]): "over-long",
        b"age-encryption.org/v1\n" + b"-> " + b"a" * 70_000: "too long",
    }
    for blob, message in cases.items():
        with pytest.raises(ReceiveError, match=message):
            decrypt_in_pieces(blob, identity, 1)
    dec = AgeDecryptor(identity_key(identity))
    dec.feed(good)
    dec.finish()
    with pytest.raises(ReceiveError, match="data after its end"):
        dec.feed(b"more")
