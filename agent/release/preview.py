"""What approving a request would release (contract §5.1): the owner's preview.

The preview is the cut's own plan (:class:`agent.release.cut.ClipCut` per file), so it states
exactly the files, spans and frames the cut then produces; the bytes are the stored bytes the
window covers, an estimate of the release. It is for the owner only: the CLI (``requests show``,
``pending``) and the app show it; nothing a requester, Home Assistant or the status topic can
read carries it, and the audit log gets it only with the decision.

An approval binds to the preview: :func:`fingerprint` names it (files, spans, frames, bytes,
recipient), the app posts the fingerprint it showed with the approval and refuses the approval
when the footage changed since (a clip recorded or shredded, the recipient's key), showing the
new preview instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any, Protocol

from agent.release.cut import ClipCut
from agent.timeutil import format_size, rfc3339


class Planner(Protocol):
    """What the preview needs of the cut (:class:`agent.release.cut.WindowCutter` fits)."""

    def preview(self, window_start: datetime, window_end: datetime) -> list[ClipCut]: ...


class RequestView(Protocol):
    """The request fields the preview reads (:class:`agent.requests.store.RequestRecord` fits)."""

    @property
    def jti(self) -> str: ...

    @property
    def requester_id(self) -> str: ...

    @property
    def requester_name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def kid(self) -> str: ...

    @property
    def recipient(self) -> str | None: ...

    @property
    def window_start(self) -> datetime | None: ...

    @property
    def window_end(self) -> datetime | None: ...


@dataclass(frozen=True)
class PreviewFile:
    """One file the release would hold."""

    clip_id: str
    """The stored clip it is cut from (the owner's own id; released files get fresh ones)."""
    start: datetime
    end: datetime
    frames: int
    seconds: float
    stored_bytes: int

    def to_json(self) -> dict[str, Any]:
        """The file as ``requests show --json`` prints it."""
        return {
            "clip": self.clip_id,
            "start": rfc3339(self.start),
            "end": rfc3339(self.end),
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "stored_bytes": self.stored_bytes,
        }


@dataclass(frozen=True)
class Preview:
    """Everything approving one request would release, and to whom."""

    jti: str
    files: tuple[PreviewFile, ...]
    requester_id: str
    requester_name: str
    kind: str
    kid: str
    recipient: str
    max_bytes: int

    @property
    def seconds(self) -> float:
        """Total seconds of footage."""
        return sum(f.seconds for f in self.files)

    @property
    def stored_bytes(self) -> int:
        """Stored bytes the window covers: an estimate of what leaves."""
        return sum(f.stored_bytes for f in self.files)

    @property
    def exceeds(self) -> bool:
        """Whether the release is larger than ``delivery.max_bytes`` (an approval is refused)."""
        return self.stored_bytes > self.max_bytes

    @property
    def fingerprint(self) -> str:
        """What an approval binds to (see the module docstring)."""
        return fingerprint(self)

    def to_json(self) -> dict[str, Any]:
        """The preview as ``requests show --json`` and the app's API give it."""
        return {
            "files": [f.to_json() for f in self.files],
            "seconds": round(self.seconds, 3),
            "bytes_estimate": self.stored_bytes,
            "recipient": {
                "id": self.requester_id,
                "name": self.requester_name,
                "kind": self.kind,
                "kid": self.kid,
                "age": self.recipient,
            },
            "max_bytes": self.max_bytes,
            "exceeds_max_bytes": self.exceeds,
            "fingerprint": self.fingerprint,
        }


def build_preview(record: RequestView, planner: Planner, max_bytes: int) -> Preview:
    """The preview of ``record`` (a request with a window) from the cut's plans."""
    if record.window_start is None or record.window_end is None:
        raise ValueError(f"request {record.jti} has no window")
    plans = planner.preview(record.window_start, record.window_end)
    return preview_from_plans(record, plans, max_bytes)


def preview_from_plans(record: RequestView, plans: Sequence[ClipCut], max_bytes: int) -> Preview:
    """The preview of ``record`` given the cut's plans for its window."""
    files = tuple(
        PreviewFile(p.clip_id, p.first, p.last, p.frames, p.duration, p.stored_bytes)
        for p in plans
    )
    return Preview(
        jti=record.jti,
        files=files,
        requester_id=record.requester_id,
        requester_name=record.requester_name,
        kind=record.kind,
        kid=record.kid,
        recipient=record.recipient or "",
        max_bytes=max_bytes,
    )


def fingerprint(preview: Preview) -> str:
    """A short hex digest of what the preview says would leave, and to whom."""
    doc = {
        "jti": preview.jti,
        "files": [
            [f.clip_id, rfc3339(f.start), rfc3339(f.end), f.frames, f.stored_bytes]
            for f in preview.files
        ],
        "to": [preview.requester_id, preview.kid, preview.recipient],
        "max_bytes": preview.max_bytes,
    }
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def clock_length(seconds: float) -> str:
    """``0:05``, ``12:30``, ``1:02:03``: a length of footage as a clock shows it."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def spans_text(preview: Preview, tz: tzinfo | None = None) -> str:
    """The files' spans, ``13:36:35-13:36:40, 13:37:02-13:37:10`` (in ``tz``, default local)."""
    return ", ".join(
        f"{f.start.astimezone(tz):%H:%M:%S}-{f.end.astimezone(tz):%H:%M:%S}" for f in preview.files
    )


def sentence(preview: Preview, tz: tzinfo | None = None) -> str:
    """The one-line summary: ``Release 0:05 of footage (1 file, 13:36:35-13:36:40) to City
    Police Dept.`` (or that nothing would be released)."""
    if not preview.files:
        return (
            f"No footage is recorded in this window: approving releases nothing to "
            f"{preview.requester_name} (they are told no clips were found)."
        )
    n = len(preview.files)
    files = f"{n} file" + ("" if n == 1 else "s")
    name = preview.requester_name.rstrip(".")
    return (
        f"Release {clock_length(preview.seconds)} of footage ({files}, "
        f"{spans_text(preview, tz)}) to {name}."
    )


def size_text(preview: Preview) -> str:
    """The estimated size, saying whether it is over ``delivery.max_bytes``."""
    text = (
        f"about {format_size(preview.stored_bytes)} (stored bytes the window covers: an "
        "estimate)"
    )
    if preview.exceeds:
        text += (
            f"; OVER delivery.max_bytes ({format_size(preview.max_bytes)}): an approval is "
            "refused unless you raise the setting"
        )
    return text


def exceeds_message(preview: Preview) -> str:
    """Why an approval of an over-size window is refused."""
    return (
        f"request {preview.jti} would release about {format_size(preview.stored_bytes)}, more "
        f"than delivery.max_bytes ({format_size(preview.max_bytes)}); nothing was approved"
    )
