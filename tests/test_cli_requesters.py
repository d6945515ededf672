"""`requesters add|list|revoke`, `pending`, `requests list`: formats, errors, audit."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import keys
from agent.audit import read_entries, verify_file
from agent.cli import main
from agent.requests.store import RequestStore
from agent.requests.verify import RequestPolicy, verify_request
from agent.vault import Vault
from tests.test_verify import T0, Party, token


class Device:
    """A config file and an initialised state directory."""

    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.state.mkdir(mode=0o700)
        self.key = keys.create_device_keys(self.state)
        self.config = root / "agent.yaml"
        self.config.write_text(f"device_id: front-door\nstate_dir: {self.state}\n")

    def run(self, *args: str) -> int:
        return main(["--config", str(self.config), *args])

    def events(self) -> list[str]:
        path = self.state / "audit.jsonl"
        return [e.event for e in read_entries(path)] if path.exists() else []


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def key_forms(tmp_path: Path) -> dict[str, tuple[str, Ed25519PrivateKey]]:
    """Each accepted --key form, with the private key behind it."""
    forms: dict[str, tuple[str, Ed25519PrivateKey]] = {}
    k = Ed25519PrivateKey.generate()
    (tmp_path / "k1.jwk").write_text(json.dumps(keys.public_jwk(k.public_key())))
    forms["jwk-file"] = (str(tmp_path / "k1.jwk"), k)
    k = Ed25519PrivateKey.generate()
    forms["jwk-string"] = (json.dumps({**keys.public_jwk(k.public_key()), "kid": "x"}), k)
    k = Ed25519PrivateKey.generate()
    (tmp_path / "k3.pem").write_bytes(
        k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    forms["pem-file"] = (str(tmp_path / "k3.pem"), k)
    k = Ed25519PrivateKey.generate()
    forms["raw-b64url"] = (keys.b64url(keys.raw_public_bytes(k.public_key())), k)
    return forms


@pytest.mark.parametrize("form", ["jwk-file", "jwk-string", "pem-file", "raw-b64url"])
def test_add_with_each_key_format_prints_the_kid(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    key_arg, private = key_forms(tmp_path)[form]
    code = device.run(
        "requesters",
        "add",
        "--id",
        "city-pd",
        "--name",
        "City PD",
        "--kind",
        "law-enforcement",
        f"--key={key_arg}",
        "--contact",
        "records@pd.example",
    )
    assert code == 0
    kid = keys.kid_for(private.public_key())
    assert f"kid: {kid}" in capsys.readouterr().out
    with RequestStore.open(device.state) as store:
        requester = store.get_requester("city-pd")
    assert (requester.kid, requester.contact) == (kid, "records@pd.example")
    assert device.events() == ["requester_added"]


def test_list_text_and_json(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert device.run("requesters", "list") == 0
    assert "no requesters enrolled" in capsys.readouterr().out
    forms = key_forms(tmp_path)
    device.run(
        "requesters",
        "add",
        "--id",
        "bob",
        "--name",
        "Bob",
        "--kind",
        "neighbor",
        f"--key={forms['raw-b64url'][0]}",
    )
    device.run(
        "requesters",
        "add",
        "--id",
        "acme",
        "--name",
        "ACME Insurance",
        "--kind",
        "insurer",
        f"--key={forms['jwk-file'][0]}",
    )
    device.run("requesters", "revoke", "bob")
    capsys.readouterr()
    assert device.run("requesters", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["ID", "KIND", "STATUS", "KID"]
    assert lines[1].split()[:3] == ["acme", "insurer", "active"]
    assert lines[2].split()[:3] == ["bob", "neighbor", "revoked"]
    assert device.run("requesters", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed] == ["acme", "bob"]
    assert listed[1]["revoked_at"] is not None and listed[0]["revoked_at"] is None
    assert listed[0]["public_jwk"] == keys.public_jwk(forms["jwk-file"][1].public_key())
    assert listed[0]["kid"] == keys.kid_for(forms["jwk-file"][1].public_key())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--id", "City_PD"], "requester id"),
        (["--id", "x" * 65], "requester id"),
        (["--kind", "police"], "kind"),
        (["--name", ""], "display name"),
        (["--key", "not-a-key"], "--key"),
        (["--key", '{"kty": "OKP", "crv": "Ed448", "x": "AAAA"}'], "--key"),
        (["--key", "/nonexistent/file.jwk"], "--key"),
    ],
)
def test_add_bad_inputs_exit_2_with_a_hint(
    device: Device, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    good = {
        "--id": "city-pd",
        "--name": "City PD",
        "--kind": "law-enforcement",
        "--key": keys.b64url(keys.raw_public_bytes(Ed25519PrivateKey.generate().public_key())),
    }
    good.update(dict(zip(args[::2], args[1::2], strict=True)))
    # --opt=VALUE: a base64url key may start with "-", which argparse would take for an option
    argv = [f"{name}={value}" for name, value in good.items()]
    assert device.run("requesters", "add", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("doorbell-agent: error: ") and message in err
    assert "\nhint: " in err
    assert device.events() == []
    with RequestStore.open(device.state) as store:
        assert store.list_requesters() == []


def test_add_rsa_or_ec_pem_is_refused(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = tmp_path / "ec.pem"
    pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert (
        device.run(
            "requesters", "add", "--id", "x", "--name", "X", "--kind", "other", "--key", str(pem)
        )
        == 2
    )
    assert "not Ed25519" in capsys.readouterr().err


def test_add_duplicate_id_or_key_exit_2(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_arg = key_forms(tmp_path)["jwk-file"][0]
    base = ["requesters", "add", "--name", "N", "--kind", "other"]
    assert device.run(*base, f"--key={key_arg}", "--id", "one") == 0
    capsys.readouterr()
    assert device.run(*base, f"--key={key_arg}", "--id", "two") == 2
    assert "already enrolled as requester one" in capsys.readouterr().err
    other = keys.b64url(keys.raw_public_bytes(Ed25519PrivateKey.generate().public_key()))
    assert device.run(*base, f"--key={other}", "--id", "one") == 2
    assert "already exists" in capsys.readouterr().err
    assert device.events() == ["requester_added"]


def test_add_requires_an_initialised_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(f"device_id: d\nstate_dir: {tmp_path / 'nothing'}\n")
    key = keys.b64url(keys.raw_public_bytes(Ed25519PrivateKey.generate().public_key()))
    code = main(
        [
            "--config",
            str(config),
            "requesters",
            "add",
            "--id",
            "a",
            "--name",
            "A",
            "--kind",
            "other",
            f"--key={key}",
        ]
    )
    assert code == 2
    assert "doorbell-agent init" in capsys.readouterr().err


def test_revoke_unknown_exit_2(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    assert device.run("requesters", "revoke", "ghost") == 2
    err = capsys.readouterr().err
    assert "no requester 'ghost'" in err and "hint:" in err


def test_revoke_cancels_pending_requests_and_is_audited(
    device: Device, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = Party("alice-pd")
    device.run(
        "requesters",
        "add",
        "--id",
        "alice-pd",
        "--name",
        "Alice",
        "--kind",
        "other",
        f"--key={keys.b64url(keys.raw_public_bytes(alice.key.public_key()))}",
    )
    policy = RequestPolicy(device_id="front-door")
    with RequestStore.open(device.state) as store:  # what the daemon does on receipt
        raw = token(alice, aud="front-door")
        store.admit(verify_request(raw, store, store, policy, T0), policy, T0)
    capsys.readouterr()
    assert device.run("requesters", "revoke", "alice-pd") == 0
    out = capsys.readouterr().out
    assert "revoked requester alice-pd" in out and "jti-0123456789abcdef" in out
    assert "hint: also remove alice-pd's account from the MQTT broker" in out
    assert device.events() == ["requester_added", "requester_revoked", "request_rejected"]
    assert verify_file(device.state / "audit.jsonl", device.key.public_key()).ok
    with RequestStore.open(device.state) as store:
        assert [r.jti for r in store.unanswered_revocations()] == ["jti-0123456789abcdef"]
    assert device.run("requesters", "revoke", "alice-pd") == 0
    assert "already revoked" in capsys.readouterr().out
    assert device.events() == ["requester_added", "requester_revoked", "request_rejected"]


def test_pending_and_requests_list(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    assert device.run("pending") == 0
    assert "no pending requests" in capsys.readouterr().out
    assert device.run("requests", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    alice = Party("alice-pd")
    device.run(
        "requesters",
        "add",
        "--id",
        "alice-pd",
        "--name",
        "Alice",
        "--kind",
        "law-enforcement",
        f"--key={keys.b64url(keys.raw_public_bytes(alice.key.public_key()))}",
    )
    policy = RequestPolicy(device_id="front-door")
    with RequestStore.open(device.state) as store:
        for raw in (
            token(
                alice,
                aud="front-door",
                reason="Stolen bike \x1b[31m\u202egnp.exe",
                legal_basis="warrant",
                legal_ref="W-7",
            ),
            token(alice, aud="front-door", jti="jti-second-request", reason=""),
        ):
            store.admit(verify_request(raw, store, store, policy, T0), policy, T0)
    capsys.readouterr()
    assert device.run("pending") == 0
    out = capsys.readouterr().out
    assert "jti-0123456789abcdef  pending" in out and "jti-second-request" not in out
    # Nothing holds its footage yet (no agent ran): the owner is told.
    assert "footage:     NOT held from retention" in out
    assert "alice-pd (law-enforcement)" in out
    assert "2026-01-31T11:00:00Z .. 2026-01-31T11:30:00Z" in out
    assert "warrant W-7" in out
    assert "Stolen bike \\x1b[31m\\u202egnp.exe" in out and "\x1b" not in out
    assert device.run("pending", "--json") == 0
    pending = json.loads(capsys.readouterr().out)
    assert len(pending) == 1
    item = pending[0]
    assert (item["id"], item["requester"], item["kind"], item["status"]) == (
        "jti-0123456789abcdef",
        "alice-pd",
        "law-enforcement",
        "pending",
    )
    assert item["reason"] == "Stolen bike \x1b[31m\u202egnp.exe"  # JSON keeps it verbatim
    assert (item["legal_basis"], item["legal_ref"]) == ("warrant", "W-7")
    assert item["window"] == {"start": "2026-01-31T11:00:00Z", "end": "2026-01-31T11:30:00Z"}
    assert item["footage_held"] is False
    with Vault(device.state, keys.load_storage_key(device.state)) as vault:
        vault.hold("jti-0123456789abcdef", T0 - timedelta(hours=1), T0)
    assert device.run("pending") == 0
    assert "NOT held" not in capsys.readouterr().out
    assert device.run("pending", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["footage_held"] is True
    assert device.run("requests", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["status"], r["error"]) for r in listed] == [
        ("jti-0123456789abcdef", "pending", None),
        ("jti-second-request", "rejected", "bad_claims"),
    ]
    assert device.run("requests", "list") == 0
    assert "rejected (bad_claims)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["requesters", "--help"],
        ["requesters", "add", "--help"],
        ["requesters", "list", "--help"],
        ["requesters", "revoke", "--help"],
        ["pending", "--help"],
        ["requests", "list", "--help"],
    ],
)
def test_every_subcommand_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out
