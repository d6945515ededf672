"""The key derivations age v1 builds on (age's ``primitives.go``).

Every key of an age file comes from HKDF-SHA-256: the header MAC key and the payload key from
the 16-byte file key, the X25519 wrapping key from the shared secret. The ciphers are pyca's
ChaCha20-Poly1305, which releases the GIL while it works.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FILE_KEY_BYTES = 16
TAG_BYTES = 16
"""The Poly1305 tag ChaCha20-Poly1305 adds to everything it seals."""


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA-256 as age uses it (an empty salt means no salt)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)


def payload_aead(file_key: bytes, nonce: bytes) -> ChaCha20Poly1305:
    """The payload cipher for a file key and the payload's 16-byte nonce."""
    return ChaCha20Poly1305(hkdf_sha256(file_key, nonce, b"payload"))
