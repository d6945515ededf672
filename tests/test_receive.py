"""The requester's side: reassembly, manifest and hash checks, decryption, and the MQTT loop."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from agent.errors import ReceiveError
from agent.keys import public_jwk, sign_jws
from agent.release.deliver import DeliveryJob
from agent.release.encrypt import encrypt_to_chunks
from agent.release.manifest import (
    RESPONSE_TYP,
    ManifestClip,
    manifest_claims,
    sign_manifest,
    verify_manifest,
)
from agent.requester import receive
from agent.requester.cli import main as requester_main
from agent.requester.keyfiles import generate_keys
from agent.requester.receive import DeliveryAssembler, extension_for, receive_delivery
from agent.timeutil import utcnow
from tests.mosquitto import Mosquitto
from tests.test_release_deliver import (
    PREFIX,
    T0,
    FakeClip,
    FakeVault,
    GeneratedClip,
    LoopbackPublisher,
    make_assembler,
    make_clips,
    make_deliverer,
    make_job,
    sequential_ids,
)

Messages = list[tuple[str, bytes]]


@pytest.fixture
def device_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def identity() -> x25519.Identity:
    return x25519.Identity.generate()


@pytest.fixture
def delivery(
    device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> tuple[DeliveryJob, FakeVault, Messages]:
    vault = FakeVault(make_clips())
    pub = LoopbackPublisher()
    job = make_job(str(identity.to_public()))
    make_deliverer(vault, pub, device_key, new_id=sequential_ids()).deliver(job)
    return job, vault, pub.messages


def leftovers(out: Path) -> list[str]:
    """Everything in the output directory except the assembler's private spool."""
    return sorted(p.name for p in out.iterdir() if not p.name.endswith(".partial"))


def test_tampered_chunk_is_rejected_naming_the_clip_and_nothing_is_written(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, _vault, messages = delivery
    out = tmp_path / "out"
    target = next(i for i, (t, _) in enumerate(messages) if t.endswith("/clip-1/1"))
    topic, payload = messages[target]
    messages[target] = (topic, payload[:100] + bytes([payload[100] ^ 1]) + payload[101:])
    with make_assembler(out, device_key, identity, job) as asm:
        for t, p in messages:
            asm.feed(t, p)
        assert asm.ready()
        with pytest.raises(ReceiveError, match=r"clip clip-1: .*corrupted or tampered with"):
            asm.finish()
    # the checks run before anything is decrypted: no clip, no temporary file
    assert leftovers(out) == []
    assert not any(out.iterdir())  # and close() removed the spool


def test_missing_chunk_is_named(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, _vault, messages = delivery
    out = tmp_path / "out"
    with make_assembler(out, device_key, identity, job) as asm:
        for t, p in messages:
            if not t.endswith("/clip-0/5"):
                asm.feed(t, p)
        assert not asm.ready()
        assert asm.missing() == {"clip-0": [5]}
        with pytest.raises(ReceiveError, match=r"clip clip-0: 1 of \d+ chunks missing \(5\)"):
            asm.finish()
    assert leftovers(out) == []


def test_no_manifest_means_no_output(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, _vault, messages = delivery
    with make_assembler(tmp_path / "out", device_key, identity, job) as asm:
        for t, p in messages[:-1]:
            asm.feed(t, p)
        assert not asm.ready() and asm.missing() == {}
        with pytest.raises(ReceiveError, match="no manifest received"):
            asm.finish()


def test_manifest_signed_by_another_key_is_refused(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, _vault, messages = delivery
    genuine = verify_manifest(
        messages[-1][1],
        device_key.public_key(),
        device_id=job.device_id,
        requester_id=job.requester_id,
        jti=job.jti,
    )
    claims = manifest_claims(
        device_id=job.device_id,
        requester_id=job.requester_id,
        jti=job.jti,
        window=job.window,
        attempt=genuine.attempt,
        clips=genuine.clips,
        now=job.window_end,
    )
    forged = sign_manifest(Ed25519PrivateKey.generate(), claims).encode()
    with make_assembler(tmp_path / "out", device_key, identity, job) as asm:
        with pytest.raises(ReceiveError, match="does not verify with the device key"):
            asm.feed(messages[-1][0], forged)
        assert asm.manifest is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("aud", "someone-else", "manifest aud"), ("req", "other-request-1234", "manifest req")],
)
def test_manifest_for_another_request_or_requester_is_refused(
    device_key: Ed25519PrivateKey,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
    field: str,
    value: str,
    message: str,
) -> None:
    job, _vault, _messages = delivery
    claims = manifest_claims(
        device_id=job.device_id,
        requester_id=job.requester_id,
        jti=job.jti,
        window=job.window,
        attempt=1,
        clips=[],
        now=job.window_end,
    )
    claims[field] = value
    token = sign_manifest(device_key, claims)
    with pytest.raises(ReceiveError, match=message):
        verify_manifest(
            token,
            device_key.public_key(),
            device_id=job.device_id,
            requester_id=job.requester_id,
            jti=job.jti,
        )


def test_response_token_is_not_accepted_as_a_manifest(
    device_key: Ed25519PrivateKey, delivery: tuple[DeliveryJob, FakeVault, Messages]
) -> None:
    job, _vault, _messages = delivery
    token = sign_jws(device_key, RESPONSE_TYP, {"iss": job.device_id, "clips": []})
    with pytest.raises(ReceiveError, match="expected a doorbell-manifest"):
        verify_manifest(
            token,
            device_key.public_key(),
            device_id=job.device_id,
            requester_id=job.requester_id,
            jti=job.jti,
        )


def test_manifest_with_unsafe_clip_id_is_refused(
    device_key: Ed25519PrivateKey, delivery: tuple[DeliveryJob, FakeVault, Messages]
) -> None:
    job, _vault, messages = delivery
    genuine = verify_manifest(
        messages[-1][1],
        device_key.public_key(),
        device_id=job.device_id,
        requester_id=job.requester_id,
        jti=job.jti,
    )
    claims = manifest_claims(
        device_id=job.device_id,
        requester_id=job.requester_id,
        jti=job.jti,
        window=job.window,
        attempt=genuine.attempt,
        clips=genuine.clips,
        now=job.window_end,
    )
    claims["clips"][0]["id"] = "../../etc/passwd"
    with pytest.raises(ReceiveError, match="not a safe name"):
        verify_manifest(
            sign_manifest(device_key, claims),
            device_key.public_key(),
            device_id=job.device_id,
            requester_id=job.requester_id,
            jti=job.jti,
        )


def test_wrong_identity_cannot_decrypt_and_leaves_nothing(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, _vault, messages = delivery
    out = tmp_path / "out"
    with make_assembler(out, device_key, x25519.Identity.generate(), job) as asm:
        for t, p in messages:
            asm.feed(t, p)
        with pytest.raises(ReceiveError, match="clip clip-0: cannot decrypt"):
            asm.finish()
    assert leftovers(out) == []


def test_plaintext_hash_mismatch_is_refused_and_temp_file_removed(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, _vault, messages = delivery
    genuine = verify_manifest(
        messages[-1][1],
        device_key.public_key(),
        device_id=job.device_id,
        requester_id=job.requester_id,
        jti=job.jti,
    )
    claims = manifest_claims(
        device_id=job.device_id,
        requester_id=job.requester_id,
        jti=job.jti,
        window=job.window,
        attempt=genuine.attempt,
        clips=genuine.clips,
        now=job.window_end,
    )
    claims["clips"][1]["plaintext_sha256"] = hashlib.sha256(b"something else").hexdigest()
    messages[-1] = (messages[-1][0], sign_manifest(device_key, claims).encode())
    out = tmp_path / "out"
    with make_assembler(out, device_key, identity, job) as asm:
        for t, p in messages:
            asm.feed(t, p)
        with pytest.raises(ReceiveError, match="clip clip-1: the decrypted video does not match"):
            asm.finish()
    # clip-0 (video and age file) was verified and kept; clip-1's temporary plaintext is gone
    assert leftovers(out) == ["clip-0.age", "clip-0.avi"]


def test_foreign_and_malformed_topics(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, _vault, _messages = delivery
    base = f"{PREFIX}/{job.device_id}/deliveries/{job.requester_id}/{job.jti}/"
    with make_assembler(tmp_path / "out", device_key, identity, job) as asm:
        assert asm.feed(f"{PREFIX}/{job.device_id}/deliveries/other/x/c/0", b"zz") is False
        for leaf in ("clip-0/-1", "clip-0/01", "clip-0", "a/b/c", "..%2f/0"):
            with pytest.raises(ReceiveError, match="unexpected delivery topic"):
                asm.feed(base + leaf, b"zz")


def test_extensions() -> None:
    assert extension_for("video/x-msvideo") == ".avi"
    assert extension_for("video/mp4") == ".mp4"
    assert extension_for("application/x-unheard-of") == ".bin"


def queue_source(messages: Messages) -> Callable[[float], tuple[str, bytes] | None]:
    pending = list(messages)
    return lambda _wait: pending.pop(0) if pending else None


def test_receive_loop_skips_forged_manifests_and_finishes(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, vault, messages = delivery
    manifest_topic = messages[-1][0]
    forged = sign_manifest(
        Ed25519PrivateKey.generate(),
        manifest_claims(
            device_id=job.device_id,
            requester_id=job.requester_id,
            jti=job.jti,
            window=job.window,
            attempt=1,
            clips=[],
            now=job.window_end,
        ),
    ).encode()
    feed = [(manifest_topic, forged), *messages]
    with make_assembler(tmp_path / "out", device_key, identity, job) as asm:
        clips = receive_delivery(asm, queue_source(feed), timeout=30)
    assert [c.path.read_bytes() for c in clips] == [c.data for c in vault.clips]


def test_receive_loop_names_missing_chunks_after_the_grace_period(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, _vault, messages = delivery
    feed = [m for m in messages if not m[0].endswith("/clip-1/0")]
    ticks = iter(range(1000))
    missing = r"clip clip-1: 1 of \d+ chunks missing \(0\)"
    with (
        make_assembler(tmp_path / "out", device_key, identity, job) as asm,
        pytest.raises(ReceiveError, match=missing),
    ):
        receive_delivery(
            asm, queue_source(feed), timeout=10_000, grace=5, clock=lambda: float(next(ticks))
        )


def test_receive_loop_times_out_without_a_manifest(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, _vault, messages = delivery
    ticks = iter(range(1000))
    with (
        make_assembler(tmp_path / "out", device_key, identity, job) as asm,
        pytest.raises(ReceiveError, match="no complete delivery"),
    ):
        receive_delivery(
            asm, queue_source(messages[:-1]), timeout=50, clock=lambda: float(next(ticks))
        )


def response(key: Ed25519PrivateKey, job: DeliveryJob, status: str) -> bytes:
    claims = {"iss": job.device_id, "aud": job.requester_id, "iat": 0, "req": job.jti}
    return sign_jws(key, RESPONSE_TYP, {**claims, "status": status}).encode()


def test_failed_response_ends_the_wait_and_forged_ones_are_ignored(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, _vault, messages = delivery
    with make_assembler(tmp_path / "out", device_key, identity, job) as asm:
        feed = [
            *messages[:3],
            (asm.responses_topic, response(Ed25519PrivateKey.generate(), job, "denied")),
            (asm.responses_topic, response(device_key, job, "failed")),
            *messages[3:],
        ]
        with pytest.raises(ReceiveError, match=r"delivering request .* failed"):
            receive_delivery(asm, queue_source(feed), timeout=30)


def test_receive_command_over_a_real_broker(
    tmp_path: Path,
    mosquitto: Mosquitto,
    device_key: Ed25519PrivateKey,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = generate_keys(tmp_path / "keys", "police-7", now=utcnow())
    vault = FakeVault(make_clips())
    pub = LoopbackPublisher()
    job = make_job(keys.recipient)
    make_deliverer(vault, pub, device_key, new_id=sequential_ids()).deliver(job)
    key_file = tmp_path / "device.jwk"
    key_file.write_text(json.dumps(public_jwk(device_key.public_key())))
    out = tmp_path / "out"
    argv = [
        "receive",
        "--device",
        job.device_id,
        "--request",
        job.jti,
        "-o",
        str(out),
        "--key",
        str(tmp_path / "keys"),
        "--device-key",
        str(key_file),
        "--timeout",
        "60s",
        "--host",
        mosquitto.host,
        "--port",
        str(mosquitto.port),
    ]
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(requester_main(argv)))
    worker.start()
    publisher = mosquitto.client()
    try:
        # publish once the command's subscriptions are acknowledged
        deadline = time.monotonic() + 30
        while "waiting for the delivery" not in capsys.readouterr().out:
            assert time.monotonic() < deadline, "receive never subscribed"
            time.sleep(0.05)
        for topic, payload in pub.messages:
            publisher.publish(topic, payload)
        worker.join(60)
    finally:
        publisher.close()
    assert codes == [0]
    assert [(out / f"{c.id}.avi").read_bytes() for c in vault.clips] == [
        c.data for c in vault.clips
    ]


def test_chunks_are_decrypted_as_they_arrive_but_nothing_takes_a_final_name_before_the_manifest(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, vault, messages = delivery
    out = tmp_path / "out"
    with make_assembler(out, device_key, identity, job) as asm:
        for t, p in messages[:-1]:
            asm.feed(t, p)
        # only temporary files so far, one per clip, holding what has authenticated
        temps = leftovers(out)
        assert len(temps) == 3
        assert all(n.startswith(".clip-") and n.endswith(".part") for n in temps)
        assert not any((out / f"{c.id}.avi").exists() for c in vault.clips)
        asm.feed(*messages[-1])
        received = asm.finish()
    assert [r.path.read_bytes() for r in received] == [c.data for c in vault.clips]
    # each verified video beside its age file as received (the requester's evidence)
    assert leftovers(out) == [f"clip-{i}.{ext}" for i in range(3) for ext in ("age", "avi")]
    assert asm.manifest is not None
    for listed, age in zip(asm.manifest.clips, sorted(out.glob("*.age")), strict=True):
        assert age.name == f"{listed.id}.age"
        assert age.stat().st_mode & 0o777 == 0o600
        assert hashlib.sha256(age.read_bytes()).hexdigest() == listed.sha256


def test_closing_before_the_manifest_leaves_nothing(
    tmp_path: Path,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
    delivery: tuple[DeliveryJob, FakeVault, Messages],
) -> None:
    job, _vault, messages = delivery
    out = tmp_path / "out"
    with make_assembler(out, device_key, identity, job) as asm:
        for t, p in messages[:-1]:
            asm.feed(t, p)
        assert leftovers(out)
    assert not any(out.iterdir())


def test_a_stale_chunk_from_an_earlier_attempt_is_replaced_and_decryption_starts_over(
    tmp_path: Path, device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    vault = FakeVault(make_clips())
    job = make_job(str(identity.to_public()))
    first, second = LoopbackPublisher(), LoopbackPublisher()
    # A device that reused file ids across attempts (this one never does: each attempt has
    # fresh ones) must still not get a stale chunk spliced in.
    make_deliverer(vault, first, device_key, new_id=sequential_ids()).deliver(job)
    make_deliverer(vault, second, device_key, new_id=sequential_ids()).deliver(job)
    old = dict(first.messages)
    new = second.messages
    stale_topic = next(t for t, _ in new if t.endswith("/clip-0/3"))
    assert old[stale_topic] != dict(new)[stale_topic]
    out = tmp_path / "out"
    with make_assembler(out, device_key, identity, job) as asm:
        for t, p in new:
            if t == stale_topic:
                # a late copy of the first attempt's chunk lands in order, before the new one:
                # chunks 0-2 must be decrypted again from the spool once it is replaced
                asm.feed(t, old[t])
            asm.feed(t, p)
        received = asm.finish()
    assert [r.path.read_bytes() for r in received] == [c.data for c in vault.clips]


def test_plaintext_is_synced_in_the_background_while_chunks_arrive(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    device_key: Ed25519PrivateKey,
    identity: x25519.Identity,
) -> None:
    monkeypatch.setattr(receive, "_SYNC_BYTES", 64 * 1024)
    synced: list[int] = []
    real = receive._sync_quietly

    def sync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(receive, "_sync_quietly", sync)
    clip = FakeClip("big", T0, T0 + timedelta(seconds=30), "video/mp4", random.randbytes(700_000))
    vault = FakeVault([clip])
    pub = LoopbackPublisher()
    job = make_job(str(identity.to_public()))
    make_deliverer(
        vault, pub, device_key, chunk_bytes=16 * 1024, new_id=sequential_ids()
    ).deliver(job)
    with make_assembler(tmp_path / "out", device_key, identity, job) as asm:
        for t, p in pub.messages:
            asm.feed(t, p)
        (received,) = asm.finish()
    assert received.path.read_bytes() == clip.data
    assert synced


def test_requester_memory_stays_flat_whatever_the_clip_size(
    tmp_path: Path, device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    peaks = {}
    job = make_job(str(identity.to_public()))
    base = f"{PREFIX}/{job.device_id}/deliveries/{job.requester_id}/{job.jti}/"
    for size in (4 * 1024**2, 32 * 1024**2):
        source = GeneratedClip(size)
        out = tmp_path / f"out-{size}"
        with make_assembler(out, device_key, identity, job) as asm:

            def sink(seq: int, chunk: bytes, asm: DeliveryAssembler = asm) -> None:
                asm.feed(f"{base}clip-0/{seq}", chunk)

            tracemalloc.start()
            try:
                result = encrypt_to_chunks(source, identity.to_public(), 256 * 1024, sink)
                entry = ManifestClip(
                    "clip-0",
                    T0,
                    T0,
                    "video/mp4",
                    result.chunks,
                    result.bytes,
                    result.sha256,
                    result.plaintext_sha256,
                    frames=1,
                    clock_synchronized=True,
                    source="0" * 64,
                )
                claims = manifest_claims(
                    device_id=job.device_id,
                    requester_id=job.requester_id,
                    jti=job.jti,
                    window=job.window,
                    attempt=1,
                    clips=[entry],
                    now=T0,
                )
                asm.feed(base + "manifest", sign_manifest(device_key, claims).encode())
                (received,) = asm.finish()
                peaks[size] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert received.bytes == size
        assert received.plaintext_sha256 == source.digest.hexdigest()
    # device and requester together: a few chunks in flight, whatever the clip size
    assert peaks[32 * 1024**2] < 4 * 1024**2
    assert peaks[32 * 1024**2] < peaks[4 * 1024**2] + 512 * 1024
