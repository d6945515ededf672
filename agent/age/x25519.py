"""The X25519 recipient type of age v1 (age's ``x25519.go``): wrap and unwrap the file key.

A file key is wrapped for a recipient with an ephemeral X25519 key: the stanza is
``-> X25519 SHARE`` and its body is the file key sealed with ChaCha20-Poly1305 under a zero
nonce and ``HKDF(shared secret, salt=SHARE || RECIPIENT, info="age-encryption.org/v1/X25519")``.
pyrage parses and validates the ``age1...`` recipient strings; the raw keys come from their
Bech32 form (:mod:`agent.age.bech32`), because pyrage does not expose them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyrage
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.age.bech32 import bech32_decode
from agent.age.format import Stanza, b64_decode, b64_encode
from agent.age.primitives import FILE_KEY_BYTES, TAG_BYTES, hkdf_sha256
from agent.errors import DeliveryError, ReceiveError

LABEL = b"age-encryption.org/v1/X25519"
STANZA_TYPE = b"X25519"
_ZERO_NONCE = bytes(12)


def parse_recipient(text: str) -> pyrage.x25519.Recipient:
    """An age X25519 recipient from its ``age1...`` string; raises DeliveryError if malformed."""
    if not isinstance(text, str) or not text.startswith("age1"):
        raise DeliveryError(f"{text!r} is not an age X25519 recipient (age1...)")
    try:
        return pyrage.x25519.Recipient.from_str(text)
    except pyrage.RecipientError as exc:
        raise DeliveryError(f"{text!r} is not a valid age X25519 recipient: {exc}") from None


def recipient_key(recipient: pyrage.x25519.Recipient | str) -> bytes:
    """The 32-byte X25519 public key of an age recipient; raises DeliveryError if malformed."""
    rcpt = parse_recipient(recipient) if isinstance(recipient, str) else recipient
    try:
        key = bech32_decode(str(rcpt), "age")
    except ValueError as exc:
        raise DeliveryError(f"{str(rcpt)!r} is not a valid age X25519 recipient: {exc}") from None
    if len(key) != 32:
        raise DeliveryError(f"{str(rcpt)!r} does not hold a 32-byte X25519 key")
    return key


def identity_key(identity: pyrage.x25519.Identity) -> X25519PrivateKey:
    """The X25519 private key inside an age identity (``AGE-SECRET-KEY-1...``)."""
    try:
        secret = bech32_decode(str(identity), "age-secret-key-")
    except ValueError as exc:
        raise ReceiveError(f"the age identity is malformed: {exc}") from None
    if len(secret) != 32:
        raise ReceiveError("the age identity does not hold a 32-byte X25519 key")
    return X25519PrivateKey.from_private_bytes(secret)


def _wrap_aead(shared: bytes, share: bytes, recipient: bytes) -> ChaCha20Poly1305:
    """The cipher that wraps the file key in an X25519 stanza."""
    return ChaCha20Poly1305(hkdf_sha256(shared, share + recipient, LABEL))


def wrap(recipient: bytes, file_key: bytes, randbytes: Callable[[int], bytes]) -> Stanza:
    """The stanza that gives ``file_key`` to the X25519 public key ``recipient``.

    ``randbytes(32)`` is the ephemeral private key. A low-order ``recipient`` raises
    DeliveryError.
    """
    ephemeral = X25519PrivateKey.from_private_bytes(randbytes(32))
    share = ephemeral.public_key().public_bytes_raw()
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    except ValueError:
        # A low-order point gives an all-zero secret: the file key would be readable by anyone.
        raise DeliveryError("the age recipient is not a usable X25519 public key") from None
    body = _wrap_aead(shared, share, recipient).encrypt(_ZERO_NONCE, file_key, None)
    return Stanza(STANZA_TYPE, (b64_encode(share),), body)


def unwrap(identity: X25519PrivateKey, stanzas: Sequence[Stanza]) -> bytes:
    """The file key from the first X25519 stanza ``identity`` opens; ReceiveError if none does."""
    recipient = identity.public_key().public_bytes_raw()
    for stanza in stanzas:
        if stanza.type != STANZA_TYPE:
            continue  # another recipient type, or age's random "grease" stanza
        try:
            if len(stanza.args) != 1 or len(stanza.body) != FILE_KEY_BYTES + TAG_BYTES:
                raise ValueError
            share = b64_decode(stanza.args[0])
            shared = identity.exchange(X25519PublicKey.from_public_bytes(share))
        except ValueError:
            # Malformed, or a low-order share (all-zero secret): the spec says fail.
            raise ReceiveError("the age header has a malformed X25519 stanza") from None
        try:
            return _wrap_aead(shared, share, recipient).decrypt(_ZERO_NONCE, stanza.body, None)
        except InvalidTag:
            continue
    raise ReceiveError("no recipient stanza in the age header is for this identity")
