"""The example broker configuration against a real mosquitto: the ACL's revision-2 topics
(receipts, the device reading its own retained audit head) and the dynamic-security set-up that
binds the device account to the device's client id."""

from __future__ import annotations

import glob
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.provision import device_client_id
from tests.mosquitto import Mosquitto
from tests.test_mqtt_service import (
    DEVICE,
    PREFIX,
    TOPIC_HEAD,
    TOPIC_REQUESTS,
    AgentHarness,
    next_response,
    request,
    responses_topic,
)

REPO = Path(__file__).resolve().parent.parent
ACL_EXAMPLE = REPO / "config" / "mosquitto-acl.example"
DYNSEC_SCRIPT = REPO / "config" / "mosquitto-dynsec.example.sh"
DEVICE_USER = f"doorbell-{DEVICE}"
TOPIC_RECEIPTS = f"{PREFIX}/{DEVICE}/receipts"
REFUSED = 0x87


def test_example_acl_lets_requesters_send_receipts_and_the_device_read_them_and_its_head(
    mosquitto_factory: Callable[..., Mosquitto],
) -> None:
    broker = mosquitto_factory(
        passwords={DEVICE_USER: "device-pw", "alice": "alice-pw"}, acl=ACL_EXAMPLE.read_text()
    )
    device = broker.client(username=DEVICE_USER, password="device-pw")
    alice = broker.client(username="alice", password="alice-pw")
    try:
        device.publish(TOPIC_HEAD, b"head-1", retain=True)
        assert device.subscribe(TOPIC_HEAD) == [1]
        assert bytes(device.get().payload) == b"head-1"  # its own retained head, read back
        assert device.subscribe(TOPIC_RECEIPTS) == [1]
        snoop = alice.subscribe(TOPIC_RECEIPTS)  # a requester must not read others' receipts
        alice.publish(TOPIC_RECEIPTS, b"receipt-from-alice")
        assert bytes(device.get().payload) == b"receipt-from-alice"
        alice.publish(TOPIC_REQUESTS, b"marker")  # not readable by alice: nothing comes back
        assert snoop == [REFUSED] or alice.messages.empty()
    finally:
        device.close()
        alice.close()


def _dynsec_plugin() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so"))
    return found[0] if found else None


@pytest.mark.skipif(_dynsec_plugin() is None, reason="mosquitto dynamic-security plugin missing")
def test_dynsec_example_binds_the_device_account_to_its_client_id(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    dynsec = tmp_path / "dynamic-security.json"
    subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(dynsec), "admin", "admin-pw"],
        check=True, capture_output=True,
    )
    broker = mosquitto_factory(
        extra_conf=f"allow_anonymous false\nplugin {_dynsec_plugin()}\n"
        f"plugin_opt_config_file {dynsec}\n"
    )
    pwfile = tmp_path / "device.pw"
    pwfile.write_text("device-pw\n")
    os.chmod(pwfile, 0o600)
    h = AgentHarness(
        tmp_path, broker, {"mqtt": {"username": DEVICE_USER, "password_file": str(pwfile)}}
    )
    client_id = device_client_id(h.state, DEVICE)
    env = {
        **os.environ, "HOST": broker.host, "PORT": str(broker.port), "ADMIN_PASSWORD": "admin-pw",
        "DEVICE_PASSWORD": "device-pw", "CLIENT_ID": client_id, "DEVICE": DEVICE,
        "PREFIX": PREFIX,
    }
    subprocess.run(["sh", str(DYNSEC_SCRIPT)], check=True, env=env, capture_output=True)
    subprocess.run(
        ["sh", str(DYNSEC_SCRIPT), "requester"], check=True, capture_output=True,
        env={**env, "REQUESTER": "alice", "REQUESTER_PASSWORD": "alice-pw"},
    )
    try:
        # The device account works only as the device's client id.
        with pytest.raises(ConnectionError):
            broker.client("doorbell-agent-front-door", username=DEVICE_USER, password="device-pw")
        alice_req = h.enroll("alice")
        h.start()  # the real requests worker, connecting with its suffixed client id
        alice = broker.client(username="alice", password="alice-pw")
        assert alice.subscribe(responses_topic("alice")) == [1]
        assert alice.subscribe(responses_topic("bob")) == [REFUSED]
        assert alice.subscribe(TOPIC_RECEIPTS) == [REFUSED]
        token, jti = request(alice_req)
        alice.publish(TOPIC_REQUESTS, token)
        claims, _ = next_response(alice, h.public)
        assert (claims["req"], claims["status"]) == (jti, "pending")
        alice.publish(f"{PREFIX}/{DEVICE}/receipts", b"not a receipt")  # allowed to publish
        alice.close()
    finally:
        h.stop()
