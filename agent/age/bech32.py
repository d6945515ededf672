"""Bech32 decoding (BIP 173 without its length limit), as age spells keys: ``age1...``.

The counterpart of age's ``internal/bech32``; only decoding is needed here (pyrage writes keys).
"""

from __future__ import annotations

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def _polymod(values: list[int]) -> int:
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
        data = [_CHARSET.index(c) for c in text[sep + 1 :]]
    except ValueError:
        raise ValueError("character outside the Bech32 alphabet") from None
    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    if _polymod(expanded + data) != 1:
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
