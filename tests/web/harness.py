"""A real device state (keys, audit log, request store, vault, approval coordinator) behind the
local app, with an injectable clock; used through the fixtures in ``tests/web/conftest.py``.

- :class:`WebHarness` (``make_harness``): everything wired; ``web.client`` is a TestClient on
  ``https://testserver``; ``web.login()`` logs it in and returns the CSRF token;
  ``web.submit_request(...)`` signs a request as an enrolled requester and admits it through the
  real verifier and store; ``web.record_clip(start)`` records a real MJPEG/Matroska clip with
  the camera's recorder into the real vault.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 for its TestClient; httpx (what is installed) still works.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

from agent import config as config_mod
from agent.approval.coordinator import ApprovalCoordinator
from agent.approval.machine import Policy
from agent.approval.worker import previewer
from agent.audit import AuditLog
from agent.config import Config
from agent.keys import create_device_keys, kid_for, load_storage_key, write_secret
from agent.paths import APP_PASSWORD
from agent.provision import make_state_dir, make_tls_certificate
from agent.release.cut import WindowCutter
from agent.release.deliver import Deliverer
from agent.requester.build import build_request
from agent.requests.store import RequestRecord, RequestStore
from agent.requests.verify import RequestPolicy, VerifiedRequest, verify_request
from agent.timeutil import utcnow
from agent.vault import ClipInfo, Vault
from agent.web.app import WebApp
from agent.web.auth import LoginLimiter, PasswordFile, SessionStore
from agent.web.server import build_services
from agent.web.services import StatusItem
from tests.realclips import record_clip

PASSWORD = "correct horse battery staple"
DEVICE = "front-door"
REQUESTER = "city-police"
# Cheap argon2id parameters keep the many logins of the suite fast; verification reads the
# parameters from the stored hash, so the app code path is the production one.
TEST_HASHER = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)


class Clock:
    """Real time plus an offset the test can advance (sessions, lockouts, request deadlines)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


class MemoryPublisher:
    """Delivery's publisher keeping the (age-encrypted) messages in memory."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def make_room(self) -> None:
        return None

    def publish(self, topic: str, payload: bytes, qos: int, *, expiry: int | None = None) -> None:
        assert qos == 1
        self.messages.append((topic, payload))

    def drain(self) -> None:
        return None

    def wait_connected(self, timeout: float) -> bool:
        return True


async def no_sleep(_seconds: float) -> None:
    return None


@dataclass
class WebHarness:
    """A device with the app in front of it (see the module docstring)."""

    state: Path
    cfg: Config
    clock: Clock
    key: Ed25519PrivateKey
    audit: AuditLog
    store: RequestStore
    vault: Vault
    coordinator: ApprovalCoordinator
    web: WebApp
    client: TestClient
    publisher: MemoryPublisher
    requester_key: Ed25519PrivateKey
    identity: x25519.Identity
    responses: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    @property
    def password_path(self) -> Path:
        return self.state / APP_PASSWORD

    def login(self, client: TestClient | None = None, password: str = PASSWORD) -> str:
        """Log ``client`` in; returns the session's CSRF token."""
        client = client or self.client
        response = self.try_login(client, password)
        assert response.status_code == 303, response.text
        session = client.get("/api/session")
        assert session.status_code == 200
        token: str = session.json()["csrf_token"]
        return token

    def try_login(self, client: TestClient, password: str) -> Any:
        """One login attempt through the form (with its double-submit token)."""
        page = client.get("/login")
        match = re.search(r'name="login_token" value="([^"]+)"', page.text)
        assert match, page.text
        return client.post(
            "/login",
            data={"password": password, "login_token": match.group(1)},
            follow_redirects=False,
        )

    def submit_request(
        self,
        reason: str = "Package theft reported at 14:00, checking the porch camera.",
        *,
        legal_basis: str = "warrant",
        legal_ref: str | None = "W-2026-0042",
        case: str | None = "C-17",
        window: tuple[datetime, datetime] | None = None,
    ) -> str:
        """Sign a request as the enrolled requester and admit it through verifier + store."""
        now = self.clock()
        start, end = window or (now - timedelta(minutes=30), now)
        token = build_request(
            self.requester_key,
            kid_for(self.requester_key.public_key()),
            REQUESTER,
            DEVICE,
            start,
            end,
            reason,
            legal_basis,
            legal_ref,
            case,
            str(self.identity.to_public()),
            now,
            timedelta(days=2),
        )
        policy = RequestPolicy.from_config(self.cfg)
        result = verify_request(token.encode(), self.store, self.store, policy, now)
        assert isinstance(result, VerifiedRequest), result
        final = self.store.admit(result, policy, now, audit=self.audit)
        assert isinstance(final, VerifiedRequest), final
        self.coordinator.tick()  # places the retention hold, as the daemon's tick does
        return final.jti

    def record_clip(self, start: datetime, frames: int = 15, fps: float = 10.0) -> ClipInfo:
        """Record a real clip (camera recorder, MJPEG in Matroska) into the vault."""
        return record_clip(self.vault, start, frames, fps)

    def request(self, jti: str) -> RequestRecord:
        return self.store.get_request(jti)

    def audit_events(self) -> list[str]:
        from agent.audit import read_entries

        return [e.event for e in read_entries(self.audit.path)]


def make_harness(
    tmp_path: Path,
    *,
    sleep: Callable[[float], Awaitable[None]] = no_sleep,
    poll_interval: float = 1.0,
    with_tls: bool = False,
) -> WebHarness:
    """Build a :class:`WebHarness` in ``tmp_path`` (the caller closes it)."""
    state = tmp_path / "state"
    make_state_dir(state)
    key = create_device_keys(state)
    write_secret(state / APP_PASSWORD, TEST_HASHER.hash(PASSWORD).encode("ascii"))
    clock = Clock()
    if with_tls:
        make_tls_certificate(state / "tls", DEVICE, now=clock())
    cfg = config_mod.parse(
        {
            "device_id": DEVICE,
            "state_dir": str(state),
            "storage": {"retention": "7d", "max_bytes": "1GiB"},
            "app": {"session_lifetime": "1h", "bind": "127.0.0.1", "port": 8443},
        }
    )
    audit = AuditLog(state / "audit.jsonl", key, now=clock)
    store = RequestStore.open(state, now=clock)
    vault = Vault(state, load_storage_key(state), audit=audit, now=clock)
    publisher = MemoryPublisher()
    responses: list[tuple[str, str, dict[str, Any]]] = []

    def respond(request: RequestRecord, status: str, /, **claims: Any) -> None:
        responses.append((request.jti, status, claims))

    # One cutter for the preview and the release, as the daemon wires them.
    cutter = WindowCutter(vault)

    def deliverer() -> Deliverer:
        return Deliverer(
            vault=vault,
            publisher=publisher,
            signing_key=key,
            topic_prefix=cfg.mqtt.topic_prefix,
            chunk_bytes=cfg.delivery.chunk_bytes,
            retries=0,
            now=clock,
            cutter=cutter,
        )

    coordinator = ApprovalCoordinator(
        store=store,
        audit=audit,
        policy=Policy.from_settings(
            cfg.approval.channels,
            cfg.approval.require,
            cfg.approval.timeout,
            cfg.approval.confirm_window,
        ),
        vault=vault,
        respond=respond,
        deliverer_factory=deliverer,
        device_id=DEVICE,
        now=clock,
        tick_interval=3600,
        previewer=previewer(vault, cfg.delivery.max_bytes, cutter),
    )
    coordinator.start()
    requester_key = Ed25519PrivateKey.generate()
    store.add_requester(
        REQUESTER, "City Police Dept.", "law-enforcement", requester_key.public_key(),
        "Desk sergeant, +1 555 0100", audit=audit,
    )
    services = build_services(
        cfg,
        store=store,
        engine=coordinator,
        vault=vault,
        audit=audit,
        runtime=lambda: [
            StatusItem("Camera", "recording at 10 fps", True),
            StatusItem("MQTT", "connected to 127.0.0.1:1883", True),
        ],
    )
    web = WebApp(
        services,
        PasswordFile(state / APP_PASSWORD),
        SessionStore(cfg.app.session_lifetime, now=clock),
        limiter=LoginLimiter(now=clock),
        now=clock,
        sleep=sleep,
        poll_interval=poll_interval,
    )
    client = TestClient(web.asgi(), base_url="https://testserver")
    return WebHarness(
        state=state,
        cfg=cfg,
        clock=clock,
        key=key,
        audit=audit,
        store=store,
        vault=vault,
        coordinator=coordinator,
        web=web,
        client=client,
        publisher=publisher,
        requester_key=requester_key,
        identity=x25519.Identity.generate(),
        responses=responses,
    )


def close_harness(h: WebHarness) -> None:
    """Stop and close everything the harness started."""
    h.web.stopping.set()
    h.client.close()
    h.coordinator.close()
    h.vault.close()
    h.store.close()
    h.audit.close()
