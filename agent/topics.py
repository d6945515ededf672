"""The MQTT topics of the contract (§2), built in one place: pure, imports nothing of the agent.

Every level made from an id is one the caller has validated (``[A-Za-z0-9_-]``); response and
delivery topics are always built from a verified ``iss``, never from a message.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    """The contract's topics for one device under one prefix (``P/D/...``)."""

    prefix: str
    device_id: str

    @property
    def base(self) -> str:
        """``P/D``."""
        return f"{self.prefix}/{self.device_id}"

    @property
    def requests(self) -> str:
        """``P/D/requests``: requests (the device subscribes to it and ``receipts``)."""
        return f"{self.base}/requests"

    @property
    def receipts(self) -> str:
        """``P/D/receipts``: requesters' receipts for deliveries (§5.2)."""
        return f"{self.base}/receipts"

    @property
    def status(self) -> str:
        """``P/D/status`` (retained)."""
        return f"{self.base}/status"

    @property
    def audit_head(self) -> str:
        """``P/D/audit/head`` (retained)."""
        return f"{self.base}/audit/head"

    def responses(self, requester_id: str) -> str:
        """``P/D/responses/R``."""
        return f"{self.base}/responses/{requester_id}"

    def deliveries(self, requester_id: str, jti: str) -> str:
        """``P/D/deliveries/R/J`` (chunks at ``/CLIP/SEQ``, the manifest at ``/manifest``)."""
        return f"{self.base}/deliveries/{requester_id}/{jti}"

    def delivery_chunk(self, requester_id: str, jti: str, file_id: str, seq: int) -> str:
        """``P/D/deliveries/R/J/CLIP/SEQ``: chunk ``seq`` (0-based) of released file ``CLIP``."""
        return f"{self.deliveries(requester_id, jti)}/{file_id}/{seq}"

    def manifest(self, requester_id: str, jti: str) -> str:
        """``P/D/deliveries/R/J/manifest``."""
        return f"{self.deliveries(requester_id, jti)}/manifest"

    def home_assistant(self, entity: str) -> str:
        """``P/D/ha/ENTITY``: the agent's own Home Assistant state topics (not the contract's)."""
        return f"{self.base}/ha/{entity}"


DEFAULT_DISCOVERY_PREFIX = "homeassistant"
"""Home Assistant's own default MQTT discovery prefix."""


def check_discovery_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a usable topic prefix; raise ValueError saying what is wrong."""
    if not prefix or len(prefix) > 128:
        raise ValueError("must be 1-128 characters")
    if any(c in prefix for c in "+#\0"):
        raise ValueError("must not contain the MQTT wildcards + or #, or a NUL character")
    if any(level == "" for level in prefix.split("/")):
        raise ValueError("must not start or end with / or contain an empty level (//)")
    if prefix.startswith("$"):
        raise ValueError("must not start with $ (reserved for the broker's own topics)")
    return prefix
