"""`doorbell-request keygen` and the requester-side key directory and request builder."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from datetime import timedelta
from pathlib import Path

import pyrage
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import keys
from agent.errors import InsecurePermissionsError, KeyFileError, RequestError
from agent.requester import keyfiles
from agent.requester.build import build_request
from agent.requester.cli import main
from agent.requests.verify import TrustedKey, VerifiedRequest, verify_request
from tests.test_verify import DEVICE, POLICY, RECIPIENT, T0, Views


def run_keygen(out: Path, requester_id: str = "city-pd") -> int:
    return main(["keygen", "--id", requester_id, "-o", str(out)])


def test_keygen_writes_keys_with_modes_and_prints_jwk_kid_recipient(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert run_keygen(out) == 0
    printed = capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in (keyfiles.SIGNING_JWK, keyfiles.SIGNING_PEM, keyfiles.AGE_IDENTITY):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    loaded = keyfiles.load_keys(out)
    assert loaded.requester_id == "city-pd"
    public = json.loads((out / keyfiles.PUBLIC_JWK).read_text())
    assert "d" not in public
    assert json.dumps(public, sort_keys=True) in printed
    assert f"kid: {loaded.kid}" in printed
    assert f"age recipient: {loaded.recipient}" in printed
    # the homeowner enrols public-key.jwk; its thumbprint is the kid
    assert keys.kid_for(keys.parse_public_key(out / keyfiles.PUBLIC_JWK)) == loaded.kid
    # the PEM is the same signing key
    pem_key = serialization.load_pem_private_key((out / keyfiles.SIGNING_PEM).read_bytes(), None)
    assert isinstance(pem_key, Ed25519PrivateKey)
    assert keys.kid_for(pem_key.public_key()) == loaded.kid
    assert (out / keyfiles.AGE_RECIPIENT).read_text().strip() == loaded.recipient
    assert str(loaded.age_identity().to_public()) == loaded.recipient


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    assert run_keygen(out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert run_keygen(out) == 2
    err = capsys.readouterr().err
    assert err.startswith("doorbell-request: error: ") and "refusing to overwrite" in err
    assert "hint:" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_keygen_refuses_when_any_single_file_exists(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    out.mkdir()
    (out / keyfiles.AGE_RECIPIENT).write_text("mine\n")
    assert run_keygen(out) == 2
    assert sorted(p.name for p in out.iterdir()) == [keyfiles.AGE_RECIPIENT]


@pytest.mark.parametrize("bad", ["City-PD", "", "a" * 65, "a/b"])
def test_keygen_bad_id_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    assert run_keygen(tmp_path / "k", bad) == 2
    assert "hint:" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_keygen_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["keygen", "--help"])
    assert info.value.code == 0
    assert "--id" in capsys.readouterr().out


def test_load_keys_refuses_group_readable_signing_key(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    run_keygen(out)
    (out / keyfiles.SIGNING_JWK).chmod(0o640)
    with pytest.raises(InsecurePermissionsError):
        keyfiles.load_keys(out)


def test_load_keys_from_an_empty_directory_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as info:
        keyfiles.load_keys(tmp_path)
    assert info.value.hint and "keygen" in info.value.hint


@pytest.mark.skipif(shutil.which("age") is None, reason="the age tool is not installed")
def test_stock_age_decrypts_to_the_generated_identity(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    run_keygen(out)
    loaded = keyfiles.load_keys(out)
    secret = b"footage bytes"
    ciphertext = pyrage.encrypt(secret, [pyrage.x25519.Recipient.from_str(loaded.recipient)])
    (tmp_path / "clip.age").write_bytes(ciphertext)
    proc = subprocess.run(
        ["age", "-d", "-i", str(loaded.identity_path), str(tmp_path / "clip.age")],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert proc.stdout == secret


def test_generated_keys_make_requests_the_device_accepts(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    run_keygen(out)
    loaded = keyfiles.load_keys(out)
    enrolled = keys.parse_public_key(out / keyfiles.PUBLIC_JWK)
    views = Views()
    views.keys[loaded.kid] = TrustedKey(
        loaded.requester_id, "law-enforcement", loaded.kid, enrolled, False
    )
    raw = build_request(
        loaded.signing_key,
        loaded.kid,
        loaded.requester_id,
        DEVICE,
        T0 - timedelta(minutes=30),
        T0 - timedelta(minutes=10),
        "Hit and run at the corner",
        "emergency",
        None,
        "CASE-1",
        loaded.recipient,
        T0,
        timedelta(minutes=30),
    )
    result = verify_request(raw.encode(), views, views, POLICY, T0)
    assert isinstance(result, VerifiedRequest)
    assert (result.case, result.recipient, result.exp) == (
        "CASE-1",
        loaded.recipient,
        T0 + timedelta(minutes=30),
    )
    assert len(result.jti) == 32


def test_build_request_makes_fresh_jtis() -> None:
    key = Ed25519PrivateKey.generate()
    kid = keys.kid_for(key.public_key())
    args = (
        key,
        kid,
        "r",
        DEVICE,
        T0,
        T0 + timedelta(minutes=1),
        "x",
        "consent",
        None,
        None,
        RECIPIENT,
        T0,
        timedelta(minutes=5),
    )
    assert build_request(*args) != build_request(*args)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"requester_id": "Bad Id"}, "requester id"),
        ({"device_id": "front door"}, "device id"),
        ({"window_end": T0 - timedelta(minutes=5)}, "start before"),
        ({"reason": ""}, "reason"),
        ({"legal_basis": "vibes"}, "legal basis"),
        ({"legal_basis": "warrant"}, "legal reference"),
        ({"case": "c" * 129}, "case"),
        ({"recipient": "age1nope"}, "recipient"),
        ({"lifetime": timedelta(0)}, "lifetime"),
        ({"jti": "short"}, "jti"),
    ],
)
def test_build_request_refuses_what_the_device_would_reject(
    change: dict[str, object], message: str
) -> None:
    key = Ed25519PrivateKey.generate()
    kwargs: dict[str, object] = {
        "signing_key": key,
        "kid": keys.kid_for(key.public_key()),
        "requester_id": "r",
        "device_id": DEVICE,
        "window_start": T0 - timedelta(minutes=5),
        "window_end": T0,
        "reason": "x",
        "legal_basis": "consent",
        "legal_ref": None,
        "case": None,
        "recipient": RECIPIENT,
        "now": T0,
        "lifetime": timedelta(minutes=5),
    }
    kwargs.update(change)
    with pytest.raises(RequestError, match=message):
        build_request(**kwargs)  # type: ignore[arg-type]
