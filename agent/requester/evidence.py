"""The requester's evidence directory (CONTRACT §8) and its offline check (``verify DIR``).

A delivery is only worth something to a court if the chain of custody survives it, so the
requester keeps everything the device signed, exactly as received, beside what it decrypted::

    DIR/                     0700, never reused (an existing, non-empty DIR is refused)
      request.jws            the signed request as published
      device.jwk             the device public key the delivery was checked against
      responses/NNN-S.jws    every device response verified for this request, in arrival order
      manifest.jws           the signed manifest, byte for byte
      CLIP.age               each released file's age file as received
      CLIP.mkv               its decrypted video (extension from the manifest's content type)
      receipt.jws            the receipt this tool signed and published (§5.2)

Every file is 0600 and written exclusively (``O_EXCL``), so nothing in an evidence set is ever
overwritten. :func:`verify_evidence` re-checks a set against the device key the requester pinned,
never only the ``device.jwk`` stored inside it (which anyone editing the directory could swap).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.age import AgeDecryptor
from agent.age.x25519 import identity_key
from agent.errors import AgentError, ReceiveError, StateError
from agent.files import fsync_dir
from agent.keys import b64url_decode, parse_public_key, public_jwk, write_secret
from agent.release.manifest import RESPONSE_TYP, Manifest, verify_device_jws, verify_manifest
from agent.requester.build import verify_receipt
from agent.requester.receive import extension_for
from agent.requests.verify import REQUEST_TYP
from agent.timeutil import parse_rfc3339

REQUEST_FILE: Final = "request.jws"
DEVICE_KEY_FILE: Final = "device.jwk"
RESPONSES_DIR: Final = "responses"
MANIFEST_FILE: Final = "manifest.jws"
RECEIPT_FILE: Final = "receipt.jws"
AGE_SUFFIX: Final = ".age"
_READ_BYTES: Final = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


class EvidenceDir:
    """An evidence directory being written; every write is exclusive, 0600 and synced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._responses = 0

    @classmethod
    def create(cls, path: Path) -> EvidenceDir:
        """Make ``path`` (0700) for a new evidence set; refuses one that already holds files.

        An existing empty directory is taken (and tightened to 0700), so a requester may
        prepare the directory; anything inside it means an earlier evidence set, which is
        never overwritten or mixed with a new one.
        """
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            if not path.is_dir():
                raise StateError(f"{path} exists and is not a directory") from None
            if any(path.iterdir()):
                raise StateError(
                    f"{path} already holds files; an evidence set is never overwritten",
                    hint="choose another -o DIR, or move the old evidence away first",
                ) from None
        except OSError as exc:
            raise StateError(f"cannot create evidence directory {path}: {exc}") from None
        os.chmod(path, 0o700)
        return cls(path)

    @classmethod
    def open(cls, path: Path, jti: str) -> EvidenceDir:
        """The evidence directory for request ``jti``: a new one, or one left incomplete.

        ``receive J`` continues the set an interrupted ``send --wait`` started (same request,
        no manifest yet), adding files without touching any it holds; a complete set, or one
        for another request, is refused like any non-empty directory.
        """
        manifest, request = path / MANIFEST_FILE, path / REQUEST_FILE
        if (
            path.is_dir()
            and request.is_file()
            and not manifest.exists()
            and _claims_of(request.read_bytes()).get("jti") == jti
        ):
            evidence = cls(path)
            folder = path / RESPONSES_DIR
            evidence._responses = len(list(folder.glob("*.jws"))) if folder.is_dir() else 0
            return evidence
        return cls.create(path)

    def write(self, name: str, data: bytes) -> Path:
        """Write one file of the set (relative ``name``); raises StateError if it exists."""
        target = self.path / name
        try:
            write_secret(target, data)
        except FileExistsError:
            raise StateError(f"{target} already exists; evidence is never overwritten") from None
        fsync_dir(target.parent)
        return target

    def add_request(self, token: str) -> None:
        """Keep the signed request as published."""
        self.write(REQUEST_FILE, token.encode("ascii"))

    def add_device_key(self, key: Ed25519PublicKey) -> None:
        """Keep the device public key the delivery is checked against (as a JWK)."""
        self.write(DEVICE_KEY_FILE, (json.dumps(public_jwk(key), sort_keys=True) + "\n").encode())

    def add_response(self, token: bytes, status: str) -> None:
        """Keep one verified device response (numbered in arrival order)."""
        directory = self.path / RESPONSES_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        self._responses += 1
        safe = "".join(c for c in status if c.isalnum() or c in "-_")[:32] or "response"
        self.write(f"{RESPONSES_DIR}/{self._responses:03d}-{safe}.jws", token)

    def add_manifest(self, token: bytes) -> None:
        """Keep the signed manifest exactly as received."""
        self.write(MANIFEST_FILE, token)

    def add_receipt(self, token: str) -> None:
        """Keep the receipt this tool signed."""
        self.write(RECEIPT_FILE, token.encode("ascii"))


@dataclass
class EvidenceReport:
    """What :func:`verify_evidence` checked, and every problem it found."""

    request_id: str = ""
    files: int = 0
    responses: int = 0
    decrypted: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether everything held."""
        return not self.problems


def manifest_names(directory: Path) -> tuple[str, str, str] | None:
    """``(device, requester, request)`` as the (unverified) manifest in ``directory`` names them.

    Only for finding which pinned key to check the manifest with; None when unreadable.
    """
    try:
        claims = _claims_of((directory / MANIFEST_FILE).read_bytes())
    except OSError:
        return None
    names = tuple(claims.get(k) for k in ("iss", "aud", "req"))
    if not all(isinstance(n, str) for n in names):
        return None
    return str(names[0]), str(names[1]), str(names[2])


def _claims_of(token: bytes) -> dict[str, Any]:
    """The unverified payload of a compact JWS (for fields a signature check then covers)."""
    try:
        claims = json.loads(b64url_decode(token.split(b".")[1].decode("ascii")))
    except (IndexError, ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _check_manifest(directory: Path, device_key: Ed25519PublicKey) -> tuple[Manifest, bytes]:
    path = directory / MANIFEST_FILE
    try:
        token = path.read_bytes()
    except OSError as exc:
        raise ReceiveError(f"{path}: cannot read the manifest: {exc}") from None
    claims = _claims_of(token)
    names = [claims.get(k) for k in ("iss", "aud", "req")]
    if not all(isinstance(n, str) for n in names):
        raise ReceiveError(f"{path}: not a delivery manifest")
    manifest = verify_manifest(
        token, device_key, device_id=str(names[0]), requester_id=str(names[1]), jti=str(names[2])
    )
    return manifest, token


def _check_device_key_file(
    directory: Path, pinned: Ed25519PublicKey, report: EvidenceReport
) -> None:
    path = directory / DEVICE_KEY_FILE
    try:
        stored = parse_public_key(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        report.problems.append(f"{DEVICE_KEY_FILE}: cannot read it: {exc}")
        return
    except AgentError as exc:
        report.problems.append(f"{DEVICE_KEY_FILE}: not a public key: {exc}")
        return
    if public_jwk(stored) != public_jwk(pinned):
        report.problems.append(
            f"{DEVICE_KEY_FILE}: holds another key than the pinned device key (swapped)"
        )


def _check_responses(
    directory: Path, device_key: Ed25519PublicKey, manifest: Manifest, report: EvidenceReport
) -> None:
    folder = directory / RESPONSES_DIR
    paths = sorted(folder.glob("*.jws")) if folder.is_dir() else []
    if not paths:
        report.problems.append(f"{RESPONSES_DIR}/: no device response kept")
    for path in paths:
        name = f"{RESPONSES_DIR}/{path.name}"
        try:
            claims = verify_device_jws(path.read_bytes(), device_key, RESPONSE_TYP)
        except (OSError, ReceiveError) as exc:
            report.problems.append(f"{name}: {exc}")
            continue
        for key, want in (("iss", manifest.iss), ("aud", manifest.aud), ("req", manifest.req)):
            if claims.get(key) != want:
                report.problems.append(f"{name}: {key} is {claims.get(key)!r}, not {want!r}")
        report.responses += 1


def _decrypt_hash(age_path: Path, identity: Any) -> str:
    decryptor = AgeDecryptor(identity_key(identity))
    digest = hashlib.sha256()
    with age_path.open("rb") as f:
        while block := f.read(_READ_BYTES):
            for piece in decryptor.feed(block):
                digest.update(piece)
    digest.update(decryptor.finish())
    return digest.hexdigest()


def _check_files(
    directory: Path, manifest: Manifest, identity: Any, report: EvidenceReport
) -> set[str]:
    expected: set[str] = set()
    for clip in manifest.clips:
        age_name = f"{clip.id}{AGE_SUFFIX}"
        video_name = f"{clip.id}{extension_for(clip.content_type)}"
        expected.update((age_name, video_name))
        age_path, video_path = directory / age_name, directory / video_name
        if not age_path.is_file():
            report.problems.append(f"{age_name}: missing")
        elif (size := age_path.stat().st_size) != clip.bytes or sha256_file(
            age_path
        ) != clip.sha256:
            report.problems.append(
                f"{age_name}: does not match the manifest ({size} bytes; the signed manifest "
                f"says {clip.bytes} bytes, sha256 {clip.sha256[:16]}...)"
            )
        elif identity is not None:
            try:
                if _decrypt_hash(age_path, identity) != clip.plaintext_sha256:
                    report.problems.append(
                        f"{age_name}: decrypts to something else than the manifest's "
                        "plaintext_sha256"
                    )
                else:
                    report.decrypted += 1
            except ReceiveError as exc:
                report.problems.append(f"{age_name}: {exc}")
        if not video_path.is_file():
            report.problems.append(f"{video_name}: missing")
        elif sha256_file(video_path) != clip.plaintext_sha256:
            report.problems.append(
                f"{video_name}: its SHA-256 differs from the manifest's plaintext_sha256"
            )
        report.files += 1
    return expected


def _check_receipt(
    directory: Path,
    manifest: Manifest,
    manifest_token: bytes,
    requester_key: Ed25519PublicKey | None,
    report: EvidenceReport,
) -> None:
    path = directory / RECEIPT_FILE
    if not path.is_file():
        report.problems.append(f"{RECEIPT_FILE}: missing")
        return
    token = path.read_bytes()
    claims = _claims_of(token)
    if requester_key is not None:
        try:
            claims = verify_receipt(token, requester_key)
        except ReceiveError as exc:
            report.problems.append(f"{RECEIPT_FILE}: {exc}")
            return
    want = {
        "iss": manifest.aud,
        "aud": manifest.iss,
        "req": manifest.req,
        "manifest": hashlib.sha256(manifest_token).hexdigest(),
    }
    for key, value in want.items():
        if claims.get(key) != value:
            report.problems.append(f"{RECEIPT_FILE}: {key} does not match this delivery")


def _check_request(
    directory: Path,
    manifest: Manifest,
    requester_key: Ed25519PublicKey | None,
    report: EvidenceReport,
) -> None:
    path = directory / REQUEST_FILE
    if not path.is_file():
        report.problems.append(f"{REQUEST_FILE}: missing")
        return
    token = path.read_bytes()
    claims = _claims_of(token)
    if requester_key is not None:
        try:
            claims = verify_device_jws(token, requester_key, REQUEST_TYP, signer="requester")
        except ReceiveError as exc:
            report.problems.append(f"{REQUEST_FILE}: {exc}")
            return
    for key, want in (("jti", manifest.req), ("iss", manifest.aud), ("aud", manifest.iss)):
        if claims.get(key) != want:
            report.problems.append(f"{REQUEST_FILE}: {key} does not match the manifest")
    # §5.1: the manifest carries the window as requested; a release of another window is not
    # what was asked for.
    window = claims.get("window")
    try:
        asked = (
            (parse_rfc3339(window["start"]), parse_rfc3339(window["end"]))
            if isinstance(window, dict) else None
        )
    except (TypeError, KeyError, ValueError):
        asked = None
    if asked != (manifest.window_start, manifest.window_end):
        report.problems.append(f"{REQUEST_FILE}: window does not match the manifest")


def _unexpected(directory: Path, expected: Iterable[str]) -> list[str]:
    known = {REQUEST_FILE, DEVICE_KEY_FILE, MANIFEST_FILE, RECEIPT_FILE, *expected}
    found: list[str] = []
    for path in sorted(directory.iterdir()):
        if path.name == RESPONSES_DIR and path.is_dir():
            found.extend(
                f"{RESPONSES_DIR}/{p.name}" for p in sorted(path.iterdir()) if p.suffix != ".jws"
            )
        elif path.name not in known:
            found.append(path.name)
    return found


def verify_evidence(
    directory: Path,
    *,
    device_key: Ed25519PublicKey,
    identity: Any = None,
    requester_key: Ed25519PublicKey | None = None,
) -> EvidenceReport:
    """Re-check an evidence directory offline; the report lists every problem found.

    ``device_key`` is the key the requester pinned (or was given), never ``device.jwk`` from
    the directory itself: that file is only compared with it. With ``identity`` (an age
    identity) every age file is decrypted and its plaintext hash checked too; with
    ``requester_key`` the request's and the receipt's signatures are checked. Raises
    ReceiveError only when the manifest itself cannot be trusted (then nothing else can be
    checked).
    """
    if not directory.is_dir():
        raise ReceiveError(f"{directory} is not a directory")
    report = EvidenceReport()
    manifest, token = _check_manifest(directory, device_key)
    report.request_id = manifest.req
    _check_device_key_file(directory, device_key, report)
    _check_responses(directory, device_key, manifest, report)
    expected = _check_files(directory, manifest, identity, report)
    _check_request(directory, manifest, requester_key, report)
    _check_receipt(directory, manifest, token, requester_key, report)
    report.problems.extend(f"{name}: not part of this evidence set" for name in _unexpected(
        directory, expected
    ))
    return report
