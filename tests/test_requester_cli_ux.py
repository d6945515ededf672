"""`doorbell-request send`: usage errors exit 2, an unreachable broker fails after one attempt,
and a wait without an answer says something true about why."""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import MQTTConfig
from agent.errors import MQTTError
from agent.keys import sign_jws
from agent.mqtt import InboundMessage, MQTTClient
from agent.release.manifest import RESPONSE_TYP
from agent.requester.cli import main
from agent.requester.send import Exchange, follow
from agent.topics import Topics
from tests.mosquitto import Mosquitto, free_port

WINDOW = ["--from", "2026-12-06T13:00:00Z", "--to", "2026-12-06T13:30:00Z"]


@pytest.fixture
def keydir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "keys"
    assert main(["keygen", "--id", "city-police", "-o", str(out)]) == 0
    capsys.readouterr()
    return out


def _send(keydir: Path, *extra: str) -> list[str]:
    return ["send", "--key", str(keydir), "--device", "front", "--reason", "theft", *extra]


def test_window_backwards_is_a_usage_error(
    keydir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _send(keydir, "--from", "2026-12-06T13:30:00Z", "--to", "2026-12-06T13:00:00Z",
                 "--legal-basis", "consent", "--port", str(free_port()))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "doorbell-request: error: the window must start before it ends" in err


def test_warrant_without_reference_is_a_usage_error(
    keydir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_send(keydir, *WINDOW, "--legal-basis", "warrant",
                      "--port", str(free_port()))) == 2
    err = capsys.readouterr().err
    assert "a warrant needs a legal reference" in err
    assert "hint: pass --legal-ref" in err


def test_unreachable_broker_fails_after_one_attempt_without_error_logs(
    keydir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens: the attempt is refused at once
    assert main(_send(keydir, *WINDOW, "--legal-basis", "consent", "--port", str(port))) == 1
    err = capsys.readouterr().err
    assert f"could not connect to the MQTT broker at 127.0.0.1:{port}" in err
    assert "one attempt waits at most" in err
    assert "within 30 s" not in err
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # paho's per-attempt complaint is kept for -v, never shown as an error
    assert not any(
        "Client is not connected" in r.getMessage() and r.levelno > logging.DEBUG
        for r in caplog.records
    )


def _exchange() -> tuple[Exchange, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    return Exchange(Topics("doorbell", "front"), "city-police", "j" * 20, key.public_key(),
                    b"c"), key


def _no_message(_block: bool, _timeout: float | None) -> InboundMessage:
    raise queue.Empty


def test_silence_says_the_key_may_not_be_enrolled(capsys: pytest.CaptureFixture[str]) -> None:
    exchange, _ = _exchange()
    with pytest.raises(MQTTError) as info:
        follow(exchange, _no_message, timeout=0.0, silence=0.0)
    assert "the device did not answer request" in info.value.message
    assert info.value.hint is not None
    assert "not enrolled" in info.value.hint
    assert "may not have decided" not in info.value.hint


def test_pending_then_nothing_says_the_owner_has_not_decided(
    capsys: pytest.CaptureFixture[str],
) -> None:
    exchange, key = _exchange()
    token = sign_jws(key, RESPONSE_TYP, {
        "iss": "front", "aud": "city-police", "iat": 1_800_000_000, "req": exchange.jti,
        "status": "pending",
    })
    inbox: queue.Queue[InboundMessage] = queue.Queue()
    inbox.put(InboundMessage(topic=exchange.topics.responses("city-police"),
                             payload=token.encode(), qos=1, retain=False, dup=False,
                             correlation_data=None, mid=1, generation=1))
    with pytest.raises(MQTTError) as info:
        follow(exchange, inbox.get, timeout=0.2, out=lambda _line: None)
    assert "no final answer" in info.value.message
    assert info.value.hint is not None
    assert "the owner has not decided yet" in info.value.hint


def _settings(port: int) -> MQTTConfig:
    return MQTTConfig(host="127.0.0.1", port=port)


def test_broker_down_is_one_warning_not_an_error_per_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = MQTTClient(_settings(free_port()), client_id="ux-down", reconnect_min=1,
                        reconnect_max=1)
    client.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(
            "Client is not connected" in r.getMessage() for r in caplog.records
        ) < 2:
            time.sleep(0.1)  # paho retries every second: wait for a few attempts
    finally:
        client.close()
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in noisy] == ["WARNING"], [r.getMessage() for r in noisy]
    assert "retrying in the background" in noisy[0].getMessage()


def test_clean_stop_logs_no_error(mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = MQTTClient(_settings(mosquitto.port), client_id="ux-clean")
    client.start()
    client.wait_ready(10)
    client.close()
    time.sleep(0.5)  # paho's loop thread says its last words after the disconnect
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
