"""A real mosquitto broker for tests, plus a test CA and a small collecting MQTT client.

Everything binds 127.0.0.1 on free ports and lives in a temporary directory. Use it through the
fixtures in ``tests/conftest.py`` (``mosquitto``, ``mosquitto_factory``, ``test_ca``) or directly::

    with Mosquitto(tmp_path / "broker", tls=test_ca, passwords={"dev": "pw"}, acl=ACL) as broker:
        broker.port        # plain TCP listener
        broker.tls_port    # TLS listener (client certificate required), when tls= is given
        broker.restart()   # same ports, same persistence file: sessions and queued messages survive
        broker.kill()      # SIGKILL, no persistence save (a crash); start() brings it back

``TestCA`` makes a CA, a server certificate for 127.0.0.1/localhost and client certificates with
the ``cryptography`` package. ``Collector`` is a paho client (MQTT v5) that subscribes and
collects messages into a queue so a test can wait for one without sleeping.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate and its unencrypted PEM private key on disk."""

    cert: Path
    key: Path


class TestCA:
    """A throw-away certificate authority with a server certificate for 127.0.0.1 and localhost.

    ``client(cn)`` issues (and caches) a client certificate whose subject CN is ``cn``.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "doorbell test CA")])
        now = _dt.datetime.now(_dt.UTC)
        self._name = name
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_cert = directory / "ca.pem"
        self.ca_cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self.server = self._issue("server", "localhost", server=True)
        self._clients: dict[str, CertPair] = {}

    def client(self, cn: str) -> CertPair:
        """A client certificate (CN ``cn``) signed by this CA."""
        if cn not in self._clients:
            self._clients[cn] = self._issue(f"client-{cn}", cn, server=False)
        return self._clients[cn]

    def _issue(self, stem: str, cn: str, *, server: bool) -> CertPair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _dt.datetime.now(_dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                critical=False,
            )
        cert = builder.sign(self._key, hashes.SHA256())
        pair = CertPair(self.directory / f"{stem}.pem", self.directory / f"{stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        os.chmod(pair.key, 0o600)
        return pair


class Mosquitto:
    """One mosquitto process with its own config, persistence and log in ``directory``.

    Options:
      tls: a ``TestCA``; adds a TLS listener on ``tls_port`` requiring a client certificate.
      passwords: username -> password; anonymous access is then refused on every listener.
      acl: ACL file text (mosquitto ``acl_file`` syntax); applies to all listeners.
      persistence: keep sessions and queued QoS 1 messages across ``restart()`` (default on).
      extra_conf: more mosquitto.conf lines, appended verbatim.
    """

    def __init__(
        self,
        directory: Path,
        *,
        tls: TestCA | None = None,
        passwords: Mapping[str, str] | None = None,
        acl: str | None = None,
        persistence: bool = True,
        extra_conf: str = "",
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = free_port()
        self.tls_port = free_port() if tls is not None else None
        self.ca = tls
        self.config_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config(passwords, acl, persistence, extra_conf)

    def _write_config(
        self,
        passwords: Mapping[str, str] | None,
        acl: str | None,
        persistence: bool,
        extra_conf: str,
    ) -> None:
        d = self.directory
        lines = [
            # Run as root (as in CI containers) mosquitto would switch to user "mosquitto",
            # which cannot write in the test's temporary directory.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "per_listener_settings false",
            f"allow_anonymous {'false' if passwords else 'true'}",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {d}/",
            "persistence_file mosquitto.db",
            "autosave_interval 1",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
            # A flood test queues many messages for an offline session; keep them bounded.
            "max_queued_messages 10000",
            f"listener {self.port} {self.host}",
        ]
        if self.ca is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.ca.ca_cert}",
                f"certfile {self.ca.server.cert}",
                f"keyfile {self.ca.server.key}",
                "require_certificate true",
                "tls_version tlsv1.2",
            ]
        if passwords:
            pwfile = d / "passwd"
            pwfile.write_text("")
            os.chmod(pwfile, 0o600)
            for user, password in passwords.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(pwfile), user, password],
                    check=True,
                    capture_output=True,
                )
            lines.append(f"password_file {pwfile}")
        if acl is not None:
            aclfile = d / "acl"
            aclfile.write_text(acl)
            os.chmod(aclfile, 0o600)
            lines.append(f"acl_file {aclfile}")
        if extra_conf:
            lines.append(extra_conf)
        self.config_path.write_text("\n".join(lines) + "\n")

    # -- process control -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until every listener accepts connections."""
        if self.running:
            return
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        for port in ports:
            while True:
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                    raise RuntimeError(f"mosquitto exited: {err}\n{self.log_text()}")
                try:
                    socket.create_connection((self.host, port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"mosquitto did not listen on {port}") from None
                    time.sleep(0.02)

    def stop(self) -> None:
        """Stop the broker cleanly (SIGTERM: it saves persistence). Idempotent."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the broker abruptly (SIGKILL), as a crash or power cut would."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Stop cleanly and start again on the same ports."""
        self.stop()
        self.start()

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        """Stop the broker; the directory is left for the tmp_path cleanup."""
        self.stop()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_text(self) -> str:
        """The broker's log so far (handy in assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- clients ---------------------------------------------------------------------------

    def client(
        self,
        client_id: str | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_client: str | None = None,
    ) -> Collector:
        """A connected ``Collector`` on the plain listener, or the TLS one if ``tls_client``
        names the CN of a client certificate to present."""
        c = Collector(client_id or f"test-{uuid.uuid4().hex[:10]}")
        if username is not None:
            c.client.username_pw_set(username, password)
        if tls_client is not None:
            assert self.ca is not None and self.tls_port is not None, "broker has no TLS listener"
            pair = self.ca.client(tls_client)
            c.client.tls_set(
                ca_certs=str(self.ca.ca_cert), certfile=str(pair.cert), keyfile=str(pair.key)
            )
            c.connect(self.host, self.tls_port)
        else:
            c.connect(self.host, self.port)
        return c


class Collector:
    """A paho MQTT v5 client that queues every message it receives.

    ``subscribe`` waits for the SUBACK and returns the granted reason codes; ``get`` waits for the
    next message (raising ``queue.Empty`` on timeout); ``publish`` waits for the PUBACK.
    """

    def __init__(self, client_id: str) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._subacks: queue.Queue[list[int]] = queue.Queue()
        self._connected: queue.Queue[int] = queue.Queue()
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self._subacks.put(
            [c.value for c in codes]
        )
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self._connected.put(rc.value)

    def connect(self, host: str, port: int, timeout: float = 10.0) -> None:
        """Connect and wait for the CONNACK; raises ConnectionError if the broker refuses."""
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        try:
            rc = self._connected.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise ConnectionError("no CONNACK") from None
        if rc != 0:
            self.close()
            raise ConnectionError(f"broker refused the connection: reason code {rc}")

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> list[int]:
        """Subscribe and return the SUBACK reason codes (>= 0x80 means refused)."""
        self.client.subscribe(topic, qos)
        return self._subacks.get(timeout=timeout)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Publish and (for QoS 1) wait until the broker acknowledged it."""
        props = None
        if correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation_data
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos:
            info.wait_for_publish(timeout)

    def get(self, timeout: float = 10.0) -> mqtt.MQTTMessage:
        """The next message received (raises queue.Empty after ``timeout`` seconds)."""
        return self.messages.get(timeout=timeout)

    def drain(self) -> Iterator[mqtt.MQTTMessage]:
        """Every message already received, without waiting."""
        while True:
            try:
                yield self.messages.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread. Idempotent."""
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()

