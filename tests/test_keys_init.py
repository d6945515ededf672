"""Device keys, key parsing, permission refusals and `doorbell-agent init` / `config check`."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jws

from agent import keys
from agent.cli import main
from agent.errors import InsecurePermissionsError, KeyFileError, StateError


def _write_config(tmp_path: Path, **extra: str) -> Path:
    cfg = tmp_path / "agent.yaml"
    lines = [f"device_id: dev1\nstate_dir: {tmp_path / 'state'}\n"]
    lines += [f"{k}: {v}\n" for k, v in extra.items()]
    cfg.write_text("".join(lines))
    return cfg


def test_kid_is_rfc7638_thumbprint() -> None:
    key = Ed25519PrivateKey.generate()
    jwk = keys.public_jwk(key.public_key())
    # RFC 7638 §3: required members only, lexicographic order, no whitespace.
    canonical = json.dumps({"crv": jwk["crv"], "kty": "OKP", "x": jwk["x"]}, separators=(",", ":"))
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=")
    assert keys.kid_for(key.public_key()) == expected.decode()


def test_sign_jws_header_and_signature() -> None:
    key = Ed25519PrivateKey.generate()
    token = keys.sign_jws(key, "doorbell-response+jwt", {"iss": "dev1", "status": "pending"})
    verifier = keys.okp_public(key.public_key())
    obj = jws.deserialize_compact(token, verifier, algorithms=["EdDSA"])
    assert obj.protected == {
        "alg": "EdDSA",
        "typ": "doorbell-response+jwt",
        "kid": keys.kid_for(key.public_key()),
    }
    assert json.loads(obj.payload) == {"iss": "dev1", "status": "pending"}
    other = keys.okp_public(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(Exception, match="bad_signature"):
        jws.deserialize_compact(token, other, algorithms=["EdDSA"])


def test_parse_public_key_formats(tmp_path: Path) -> None:
    pub = Ed25519PrivateKey.generate().public_key()
    kid = keys.kid_for(pub)
    jwk_text = json.dumps(keys.public_jwk(pub))
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "k.jwk").write_text(jwk_text)
    (tmp_path / "k.pem").write_bytes(pem)
    raw = keys.b64url(keys.raw_public_bytes(pub))
    forms = (jwk_text, str(tmp_path / "k.jwk"), str(tmp_path / "k.pem"), raw, tmp_path / "k.pem")
    for form in forms:
        assert keys.kid_for(keys.parse_public_key(form)) == kid


@pytest.mark.parametrize(
    "bad",
    [
        '{"kty": "EC", "crv": "P-256", "x": "AA"}',
        '{"kty": "OKP", "crv": "Ed25519", "x": "tooshort"}',
        "{not json",
        "AAAA",
        "-----BEGIN PUBLIC KEY-----\nnonsense\n-----END PUBLIC KEY-----\n",
        "",
    ],
)
def test_parse_public_key_rejects(bad: str) -> None:
    with pytest.raises(KeyFileError):
        keys.parse_public_key(bad)


def test_parse_public_key_rejects_other_algorithms() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(KeyFileError, match="not Ed25519"):
        keys.parse_public_key(pem)


def test_init_creates_everything_with_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write_config(tmp_path)
    assert main(["--config", str(cfg), "init"]) == 0
    out = capsys.readouterr().out
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for secret in ("device.key", "storage.key", "app-password", "tls/key.pem"):
        assert stat.S_IMODE((state / secret).stat().st_mode) == 0o600, secret
    key = keys.load_device_key(state)
    assert keys.kid_for(key.public_key()) in out
    assert len(keys.load_storage_key(state)) == 32
    password = next(line for line in out.splitlines() if "password" in line).rsplit(" ", 1)[1]
    from argon2 import PasswordHasher

    stored = (state / "app-password").read_text()
    assert stored.startswith("$argon2id$") and password not in stored
    assert PasswordHasher().verify(stored, password)
    assert "fingerprint" in out


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write_config(tmp_path)
    assert main(["--config", str(cfg), "init"]) == 0
    before = (tmp_path / "state" / "device.key").read_bytes()
    storage_before = (tmp_path / "state" / "storage.key").read_bytes()
    capsys.readouterr()
    assert main(["--config", str(cfg), "init"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("doorbell-agent: error: ")
    assert "refusing to overwrite" in err and "hint:" in err
    assert (tmp_path / "state" / "device.key").read_bytes() == before
    assert (tmp_path / "state" / "storage.key").read_bytes() == storage_before


@pytest.mark.parametrize("name", ["device.key", "storage.key"])
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_group_or_world_readable_secret_refused(tmp_path: Path, name: str, mode: int) -> None:
    cfg = _write_config(tmp_path)
    assert main(["--config", str(cfg), "init"]) == 0
    state = tmp_path / "state"
    os.chmod(state / name, mode)
    loader = keys.load_device_key if name == "device.key" else keys.load_storage_key
    with pytest.raises(InsecurePermissionsError) as info:
        loader(state)
    assert info.value.exit_code == 2
    assert info.value.hint == f"chmod 600 {state / name}"


def test_open_state_dir_refused(tmp_path: Path) -> None:
    cfg = _write_config(tmp_path)
    assert main(["--config", str(cfg), "init"]) == 0
    state = tmp_path / "state"
    os.chmod(state, 0o755)
    with pytest.raises(InsecurePermissionsError) as info:
        keys.load_device_key(state)
    assert info.value.hint == f"chmod 700 {state}"


def test_missing_keys_say_run_init(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir(mode=0o700)
    with pytest.raises(StateError) as info:
        keys.load_device_key(tmp_path / "empty")
    assert info.value.hint is not None and "doorbell-agent init" in info.value.hint


def test_corrupt_storage_key(tmp_path: Path) -> None:
    cfg = _write_config(tmp_path)
    assert main(["--config", str(cfg), "init"]) == 0
    path = tmp_path / "state" / "storage.key"
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(KeyFileError, match="holds 5 bytes"):
        keys.load_storage_key(tmp_path / "state")


def test_config_check_ok_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write_config(tmp_path)
    assert main(["--config", str(good), "config", "check"]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: dev1\nmotion:\n  threshold: 999\n  sparkle: true\n")
    assert main(["--config", str(bad), "config", "check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"doorbell-agent: error: {bad} is not a valid configuration")
    assert "motion.threshold (line 3): Input should be less than or equal to 255" in err
    assert "motion.sparkle (line 4): unknown key in motion" in err
    assert "hint:" in err


def test_config_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOORBELL_AGENT_CONFIG", str(_write_config(tmp_path)))
    assert main(["config", "check"]) == 0
    monkeypatch.setenv("DOORBELL_AGENT_CONFIG", str(tmp_path / "missing.yaml"))
    assert main(["config", "check"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "doorbell-agent: error:" in capsys.readouterr().err
