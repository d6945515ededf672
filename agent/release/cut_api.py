"""The seam between delivery and the cut (contract §5.1): what a released file is made from.

Delivery asks a :class:`Cutter` for each stored clip overlapping the window and streams what it
gets (encrypting, chunking, hashing); it never looks inside the video. ``None`` means the clip
has no frame in the window (no file). :class:`WholeClip` is the trivial cutter that releases
stored clips as they are; :class:`agent.release.cut.WindowCutter` is the real one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class PlainStream(Protocol):
    """A front-to-back reader of a released file's plaintext (never on disk)."""

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes; b"" at the end."""
        ...

    def close(self) -> None:
        """Release what the stream holds. Idempotent."""
        ...


@dataclass(frozen=True)
class CutFile:
    """One file to release: a readable plaintext stream and what the manifest says of it."""

    clip_id: str
    """The stored clip it is cut from (the owner's log only; never published)."""
    stream: PlainStream
    frames: int
    first: datetime
    """Presentation time of its first frame."""
    last: datetime
    """Presentation time of its last frame."""
    content_type: str
    source_sha256: str | None
    """The stored clip's plaintext SHA-256 (what the manifest's ``source`` commits to)."""


class Cutter(Protocol):
    """Makes the file released for one stored clip and a window."""

    def cut(self, clip_id: str, window_start: datetime, window_end: datetime) -> CutFile | None:
        """The file holding the clip's frames in ``[window_start, window_end]``; None when
        the clip has none."""
        ...


class StoredClip(Protocol):
    """What :class:`WholeClip` reads of a vault clip's index entry."""

    @property
    def id(self) -> str: ...

    @property
    def start(self) -> datetime: ...

    @property
    def end(self) -> datetime: ...

    @property
    def frames(self) -> int: ...

    @property
    def content_type(self) -> str: ...

    @property
    def sha256(self) -> str | None: ...


@dataclass(frozen=True)
class WholeClip:
    """The trivial cutter: every overlapping stored clip is released whole (revision 1)."""

    info: Callable[[str], StoredClip]
    open: Callable[[str], PlainStream]

    def cut(self, clip_id: str, window_start: datetime, window_end: datetime) -> CutFile | None:
        """The stored clip itself, as long as it overlaps the window."""
        clip = self.info(clip_id)
        if clip.end < window_start or clip.start > window_end:
            return None
        return CutFile(
            clip_id=clip.id, stream=self.open(clip_id), frames=clip.frames, first=clip.start,
            last=clip.end, content_type=clip.content_type, source_sha256=clip.sha256,
        )
