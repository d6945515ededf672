"""The requester keeps the evidence (CONTRACT §5.2, §8): the evidence directory, key pinning,
``verify DIR``, and the per-request persistent session that survives the requester being
offline and the broker restarting."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import KeyFileError, ReceiveError, StateError
from agent.keys import b64url_decode, public_jwk, sign_jws
from agent.release.deliver import DeliveryJob
from agent.release.manifest import RESPONSE_TYP
from agent.requester.build import RECEIPT_TYP, build_receipt, build_request, verify_receipt
from agent.requester.cli import main as requester_main
from agent.requester.evidence import EvidenceDir, verify_evidence
from agent.requester.keyfiles import (
    RequesterKeys,
    generate_keys,
    pin_device_key,
    pinned_device_key,
)
from agent.requester.session import session_client_id
from agent.timeutil import rfc3339, utcnow
from tests.mosquitto import Mosquitto
from tests.test_release_deliver import (
    PREFIX,
    FakeClip,
    FakeVault,
    LoopbackPublisher,
    make_assembler,
    make_clips,
    make_deliverer,
    make_job,
    sequential_ids,
)

REQUESTER = "police-7"  # make_job's requester and device
DEVICE = "door-1"


@pytest.fixture
def device_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def keys(tmp_path: Path) -> RequesterKeys:
    return generate_keys(tmp_path / "keys", REQUESTER, now=utcnow())


def response(key: Ed25519PrivateKey, job: DeliveryJob, status: str, **extra: object) -> bytes:
    claims = {"iss": job.device_id, "aud": job.requester_id, "iat": 0, "req": job.jti}
    return sign_jws(key, RESPONSE_TYP, {**claims, "status": status, **extra}).encode()


def make_evidence(
    out: Path, device_key: Ed25519PrivateKey, keys: RequesterKeys
) -> tuple[DeliveryJob, FakeVault]:
    """A complete evidence set, written the way ``send --wait`` writes it."""
    vault = FakeVault(make_clips())
    pub = LoopbackPublisher()
    job = make_job(keys.recipient)
    make_deliverer(vault, pub, device_key, new_id=sequential_ids()).deliver(job)
    evidence = EvidenceDir.create(out)
    now = utcnow()
    evidence.add_request(build_request(
        keys.signing_key, keys.kid, REQUESTER, DEVICE, job.window_start, job.window_end,
        "bike stolen", "consent", None, None, keys.recipient, now, timedelta(days=1),
        jti=job.jti,
    ))
    evidence.add_device_key(device_key.public_key())
    for status in ("pending", "approved", "delivered"):
        evidence.add_response(response(device_key, job, status), status)
    with make_assembler(out, device_key, keys.age_identity(), job) as asm:
        for topic, payload in pub.messages:
            asm.feed(topic, payload)
        asm.finish()
        assert asm.manifest_token is not None
        evidence.add_manifest(asm.manifest_token)
        evidence.add_receipt(
            build_receipt(keys.signing_key, REQUESTER, DEVICE, job.jti, asm.manifest_token,
                          None, utcnow())
        )
    return job, vault


def check(out: Path, device_key: Ed25519PrivateKey, keys: RequesterKeys) -> list[str]:
    return verify_evidence(
        out,
        device_key=device_key.public_key(),
        identity=keys.age_identity(),
        requester_key=keys.signing_key.public_key(),
    ).problems


# --- the directory ----------------------------------------------------------------------------


def test_evidence_directory_is_private_complete_and_verifies(
    tmp_path: Path, device_key: Ed25519PrivateKey, keys: RequesterKeys
) -> None:
    out = tmp_path / "ev"
    job, vault = make_evidence(out, device_key, keys)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["request.jws", "device.jwk", "responses", "manifest.jws", "receipt.jws"]
        + [f"{c.id}.{ext}" for c in vault.clips for ext in ("age", "avi")]
    )
    assert out.stat().st_mode & 0o777 == 0o700
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    for clip in vault.clips:
        assert (out / f"{clip.id}.avi").read_bytes() == clip.data
    report = verify_evidence(
        out, device_key=device_key.public_key(), identity=keys.age_identity(),
        requester_key=keys.signing_key.public_key(),
    )
    assert report.ok, report.problems
    assert (report.request_id, report.files, report.responses, report.decrypted) == (
        job.jti, 3, 3, 3
    )


def test_an_existing_evidence_set_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    evidence = EvidenceDir.create(out)
    evidence.add_manifest(b"first")
    with pytest.raises(StateError, match="never overwritten"):
        evidence.add_manifest(b"second")
    assert (out / "manifest.jws").read_bytes() == b"first"
    with pytest.raises(StateError, match="already holds files"):
        EvidenceDir.create(out)
    empty = tmp_path / "prepared"
    empty.mkdir(mode=0o755)
    EvidenceDir.create(empty)
    assert empty.stat().st_mode & 0o777 == 0o700


def test_receive_continues_an_interrupted_set_of_the_same_request_only(tmp_path: Path) -> None:
    jti = "A" * 20
    request = f"e30.{base64.urlsafe_b64encode(json.dumps({'jti': jti}).encode()).decode()}.c2ln"
    out = tmp_path / "ev"
    first = EvidenceDir.create(out)
    first.add_request(request)
    first.add_response(b"r1", "pending")
    resumed = EvidenceDir.open(out, jti)
    resumed.add_response(b"r2", "delivered")
    assert sorted(p.name for p in (out / "responses").iterdir()) == [
        "001-pending.jws", "002-delivered.jws"
    ]
    with pytest.raises(StateError):
        EvidenceDir.open(out, "B" * 20)  # another request's set
    resumed.add_manifest(b"m")
    with pytest.raises(StateError):
        EvidenceDir.open(out, jti)  # complete: never reopened


# --- verify DIR catches any change ------------------------------------------------------------


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("manifest.jws", None),  # raises: nothing can be trusted without the manifest
        ("responses/002-approved.jws", r"responses/002-approved\.jws"),
        ("clip-0.age", r"clip-0\.age: does not match the manifest"),
        ("clip-1.avi", r"clip-1\.avi: its SHA-256 differs"),
        ("receipt.jws", r"receipt\.jws"),
        ("request.jws", r"request\.jws"),
    ],
)
def test_verify_catches_a_change_to_any_file(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    keys: RequesterKeys,
    target: str,
    expected: str | None,
) -> None:
    out = tmp_path / "ev"
    make_evidence(out, device_key, keys)
    _flip_last_byte(out / target)
    if expected is None:
        with pytest.raises(ReceiveError, match="signature does not verify"):
            check(out, device_key, keys)
        return
    problems = check(out, device_key, keys)
    assert any(re.search(expected, p) for p in problems), problems


def test_verify_catches_removed_swapped_and_added_files(
    tmp_path: Path, device_key: Ed25519PrivateKey, keys: RequesterKeys
) -> None:
    out = tmp_path / "ev"
    make_evidence(out, device_key, keys)
    (out / "clip-2.age").unlink()
    (out / "device.jwk").write_text(json.dumps(public_jwk(Ed25519PrivateKey.generate()
                                                         .public_key())))
    (out / "extra.mkv").write_bytes(b"planted")
    problems = check(out, device_key, keys)
    assert "clip-2.age: missing" in problems
    assert any("device.jwk" in p and "swapped" in p for p in problems)
    assert "extra.mkv: not part of this evidence set" in problems


def test_verify_with_a_swapped_device_key_and_re_signed_manifest_is_refused(
    tmp_path: Path, device_key: Ed25519PrivateKey, keys: RequesterKeys
) -> None:
    """Someone who re-signs everything with their own key and swaps device.jwk still fails:
    the check uses the key pinned when the delivery arrived."""
    out = tmp_path / "ev"
    make_evidence(out, device_key, keys)
    forger = Ed25519PrivateKey.generate()
    claims = json.loads(b64url_decode((out / "manifest.jws").read_text().split(".")[1]))
    (out / "manifest.jws").chmod(0o600)
    (out / "manifest.jws").write_text(sign_jws(forger, "doorbell-manifest+jwt", claims))
    (out / "device.jwk").write_text(json.dumps(public_jwk(forger.public_key())))
    with pytest.raises(ReceiveError, match="signature does not verify"):
        check(out, device_key, keys)


def test_verify_catches_a_manifest_for_another_window_than_requested(
    tmp_path: Path, device_key: Ed25519PrivateKey, keys: RequesterKeys
) -> None:
    """§5.1: the manifest's window is the request's; a device-signed manifest for a wider
    window (what a device releasing more than asked would sign) fails verify."""
    out = tmp_path / "ev"
    make_evidence(out, device_key, keys)
    assert check(out, device_key, keys) == []
    claims = json.loads(b64url_decode((out / "manifest.jws").read_text().split(".")[1]))
    claims["window"]["start"] = "2026-03-01T11:00:00Z"
    (out / "manifest.jws").write_text(sign_jws(device_key, "doorbell-manifest+jwt", claims))
    assert "request.jws: window does not match the manifest" in check(out, device_key, keys)


def test_verify_command_uses_the_pinned_key_never_only_the_one_in_dir(
    tmp_path: Path, device_key: Ed25519PrivateKey, keys: RequesterKeys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "ev"
    make_evidence(out, device_key, keys)
    base = ["verify", str(out), "--key", str(keys.directory)]
    # Nothing pinned yet: device.jwk inside DIR is not enough.
    assert requester_main(base) == 1
    assert "no key is pinned for device door-1" in capsys.readouterr().err
    pin_device_key(keys.directory, DEVICE, device_key.public_key())
    assert requester_main([*base, "--identity", str(keys.identity_path)]) == 0
    assert "verified: 3 file(s), 3 response(s), 3 decrypted" in capsys.readouterr().out
    _flip_last_byte(out / "clip-0.avi")
    assert requester_main(base) == 1
    assert "FAIL clip-0.avi" in capsys.readouterr().out


# --- pinning, receipts, the session -----------------------------------------------------------


def test_device_key_is_pinned_on_first_use_and_another_is_refused(keys: RequesterKeys) -> None:
    first, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    assert pinned_device_key(keys.directory, DEVICE) is None
    pin_device_key(keys.directory, DEVICE, first.public_key())
    pin_device_key(keys.directory, DEVICE, first.public_key())  # same key: fine
    with pytest.raises(KeyFileError, match="refusing a delivery signed by another key"):
        pin_device_key(keys.directory, DEVICE, other.public_key())
    pinned = pinned_device_key(keys.directory, DEVICE)
    assert pinned is not None and public_jwk(pinned) == public_jwk(first.public_key())


def test_receipt_claims_follow_the_contract(keys: RequesterKeys) -> None:
    manifest = b"header.payload.signature"
    head = "h.e.ad"
    token = build_receipt(keys.signing_key, REQUESTER, DEVICE, "J" * 16, manifest, head,
                          utcnow())
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert header == {"alg": "EdDSA", "kid": keys.kid, "typ": RECEIPT_TYP}
    claims = verify_receipt(token, keys.signing_key.public_key())
    assert claims["manifest"] == hashlib.sha256(manifest).hexdigest()
    assert (claims["iss"], claims["aud"], claims["req"], claims["audit_head"]) == (
        REQUESTER, DEVICE, "J" * 16, head
    )
    with pytest.raises(ReceiveError, match="requester key"):
        verify_receipt(token, Ed25519PrivateKey.generate().public_key())


def test_session_client_id_is_the_contracts() -> None:
    digest = hashlib.sha256(b"city-police/abcdefghijklmnop").digest()
    expected = "doorbell-request-" + base64.urlsafe_b64encode(digest).decode().rstrip("=")[:22]
    assert session_client_id("city-police", "abcdefghijklmnop") == expected
    assert len(expected) == len("doorbell-request-") + 22


def _wait_for_line(capsys: pytest.CaptureFixture[str], text: str, what: str) -> str:
    deadline = time.monotonic() + 30
    seen = ""
    while text not in seen:
        seen += capsys.readouterr().out
        assert time.monotonic() < deadline, f"{what}: {seen!r}"
        time.sleep(0.05)
    return seen


@pytest.mark.timeout(180)
def test_offline_requester_receives_a_large_delivery_after_a_broker_restart(
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    device_key: Ed25519PrivateKey,
    keys: RequesterKeys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``send`` subscribes the request's own persistent session before publishing and exits;
    a delivery of more than 1,000 chunks goes out while the requester is offline, the broker
    restarts in the middle, and ``receive J`` collects all of it, writes the evidence and sends
    the receipt. The broker's queue limits are the example config's."""
    example = (Path(__file__).parents[1] / "config" / "mosquitto.example.conf").read_text()
    limits = "\n".join(
        line for line in example.splitlines() if line.startswith("max_queued_")
    )
    assert "max_queued_bytes" in limits
    broker = mosquitto_factory(extra_conf=limits)
    device_jwk = tmp_path / "device.jwk"
    device_jwk.write_text(json.dumps(public_jwk(device_key.public_key())))
    broker_opts = ["--host", broker.host, "--port", str(broker.port)]
    requests = broker.client()
    requests.subscribe(f"{PREFIX}/{DEVICE}/requests")
    now = utcnow().replace(microsecond=0)
    assert requester_main([
        "send", "--device", DEVICE, "--from", rfc3339(now - timedelta(minutes=20)),
        "--to", rfc3339(now - timedelta(minutes=5)), "--reason", "bike stolen",
        "--legal-basis", "consent", "--key", str(keys.directory),
        "--device-key", str(device_jwk), *broker_opts,
    ]) == 0
    jti = capsys.readouterr().out.split()[2]
    token = requests.get(timeout=10).payload
    assert json.loads(b64url_decode(token.decode().split(".")[1]))["jti"] == jti
    requests.close()

    # The device answers and delivers while the requester is offline.
    clip = FakeClip(
        id="clip-big", start=now - timedelta(minutes=15), end=now - timedelta(minutes=14),
        content_type="video/x-matroska", data=bytes(range(256)) * 1200,
    )
    pub = LoopbackPublisher()
    job = dataclasses.replace(
        make_job(keys.recipient, jti=jti),
        window_start=now - timedelta(minutes=20), window_end=now - timedelta(minutes=5),
    )
    make_deliverer(
        FakeVault([clip]), pub, device_key, chunk_bytes=256, new_id=sequential_ids()
    ).deliver(job)
    assert len(pub.messages) > 1000
    responses = f"{PREFIX}/{DEVICE}/responses/{REQUESTER}"
    device = broker.client()
    device.publish(responses, response(device_key, job, "pending"))
    device.publish(responses, response(device_key, job, "approved"))
    half = len(pub.messages) // 2
    for topic, payload in pub.messages[:half]:
        device.publish(topic, payload)
    device.close()
    broker.restart()
    device = broker.client()
    for topic, payload in pub.messages[half:]:
        device.publish(topic, payload)
    device.publish(responses, response(device_key, job, "delivered"))
    receipts = broker.client()
    receipts.subscribe(f"{PREFIX}/{DEVICE}/receipts")
    device.close()

    out = tmp_path / "evidence"
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(requester_main(
        ["receive", jti, "-o", str(out), "--key", str(keys.directory), "--timeout", "120s",
         *broker_opts]
    )))
    worker.start()
    worker.join(150)
    assert codes == [0], capsys.readouterr()
    receipt = bytes(receipts.get(timeout=10).payload)
    receipts.close()
    assert (out / "clip-0.mkv").read_bytes() == clip.data
    assert receipt == (out / "receipt.jws").read_bytes()
    assert [p.name for p in sorted((out / "responses").iterdir())] == [
        "001-pending.jws", "002-approved.jws", "003-delivered.jws"
    ]
    assert verify_receipt(receipt, keys.signing_key.public_key())["req"] == jti
    assert requester_main(["verify", str(out), "--key", str(keys.directory)]) == 0
    assert "verified" in _wait_for_line(capsys, "verified", "verify")
