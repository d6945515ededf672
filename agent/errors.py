"""The one exception hierarchy of the agent.

Every error the program raises on purpose derives from :class:`AgentError`. The CLI turns one
into ``doorbell-agent: error: <message>`` plus an optional ``hint:`` line and exits with
``exit_code`` (2 for usage and configuration errors, 1 for other failures).
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every deliberate error; carries an optional hint and a CLI exit status."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(AgentError):
    """The command line was wrong."""

    exit_code = 2


class ConfigError(AgentError):
    """The configuration file is missing, unreadable or invalid.

    ``problems`` lists one human-readable line per invalid key, each naming the key path, the
    file line where known and what is allowed.
    """

    exit_code = 2

    def __init__(
        self, message: str, *, problems: list[str] | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.problems = list(problems or [])

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        return self.message + "\n" + "\n".join(f"  {p}" for p in self.problems)


class InsecurePermissionsError(AgentError):
    """A secret file or the state directory is readable by group or others (as ssh refuses)."""

    exit_code = 2


class StateError(AgentError):
    """The state directory is missing, not initialised, or already initialised."""

    exit_code = 2


class StateLockedError(AgentError):
    """Another ``doorbell-agent run`` holds the state directory (contract §8: exit status 1)."""


class KeyFileError(AgentError):
    """A key file is malformed or of the wrong type."""


class VaultError(AgentError):
    """Clip storage failed."""


class ClipNotFoundError(VaultError):
    """No clip with that id exists (or it was shredded)."""


class HoldRefusedError(VaultError):
    """A retention hold was refused: the held footage would exceed its cap."""


class TamperError(VaultError):
    """Stored ciphertext failed authentication: it was corrupted or tampered with."""


class AuditError(AgentError):
    """The audit log could not be written or read."""


class AuditWriteError(AuditError):
    """An audit entry could not be made durable; the action it records must not happen."""


class CameraError(AgentError):
    """A camera source could not be opened or read."""


class MQTTError(AgentError):
    """The MQTT broker could not be reached or refused us."""


class RequestError(AgentError):
    """A footage request or requester entry is invalid."""


class RequesterNotFoundError(RequestError):
    """No requester with that id is enrolled."""


class RequestNotFoundError(RequestError):
    """No request with that jti is known."""


class ApprovalError(AgentError):
    """An approval decision could not be applied (wrong state, wrong channel)."""


class PreviewChangedError(ApprovalError):
    """What an approval would release changed since the owner was shown it (contract §5.1)."""


class DeliveryError(AgentError):
    """Releasing footage to a requester failed."""


class DeliveryRevokedError(DeliveryError):
    """The requester was revoked: the delivery stops for good (``failed``, ``error: revoked``)."""


class ReceiveError(AgentError):
    """The requester side could not verify or decrypt a delivery."""
