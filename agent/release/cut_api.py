"""The seam between delivery and the cut (contract §5.1): what one released file is made of.

:mod:`agent.release.deliver` asks a :class:`Cutter` for each stored clip overlapping a request's
window and encrypts the :class:`CutFile` it returns; it never reads the vault itself. The cut
(frame-exact, smart cut for inter-coded video) lives in :mod:`agent.release.cut`; until it is
plugged in, :class:`WholeClipCutter` releases each overlapping stored clip whole, as before.

A cut must be deterministic: cutting the same window of the same clip again gives a file with the
same ``plaintext_sha256`` (re-delivery relies on it, §5.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from agent.errors import VaultError
from agent.release.encrypt import ClipReader


class StoredClip(Protocol):
    """The vault's description of a stored clip (the fields a cutter reads)."""

    @property
    def id(self) -> str: ...

    @property
    def start(self) -> datetime: ...

    @property
    def end(self) -> datetime: ...

    @property
    def content_type(self) -> str: ...

    @property
    def frames(self) -> int: ...

    @property
    def sha256(self) -> str | None: ...


class ClipVault(Protocol):
    """The part of the vault a cutter and delivery read from (:class:`agent.vault.Vault`)."""

    def clips_overlapping(self, start: datetime, end: datetime) -> Sequence[StoredClip]: ...

    def open_clip(self, clip_id: str) -> ClipReader: ...


@dataclass
class CutFile:
    """One released file's plaintext, to be read once and then closed.

    ``start``/``end`` are the presentation times of its first and last frame, ``frames`` how many
    it holds; ``source_sha256`` is the stored clip's plaintext SHA-256 (what the manifest's
    ``source`` commitment binds to). ``clock_synchronized`` says whether the device clock was
    NTP-synchronised when the footage was recorded.
    """

    stream: ClipReader
    start: datetime
    end: datetime
    frames: int
    content_type: str
    source_sha256: str
    clock_synchronized: bool
    whole: bool = False
    """The file is the stored clip unchanged: its plaintext must hash to ``source_sha256``
    (delivery checks it, so a vault altered since recording never leaves with a manifest)."""

    def close(self) -> None:
        """Release the stream (temporary files, vault readers)."""
        close = getattr(self.stream, "close", None)
        if callable(close):
            close()


class Cutter(Protocol):
    """Makes the released file for one stored clip and a window.

    Returns None when no frame of the clip falls inside the window (nothing is released for it:
    a valid answer). Raises :class:`agent.errors.VaultError` when the stored clip cannot be read
    (delivery then fails ``delivery_error``; retrying would not help).
    """

    def cut(
        self, clip_id: str, window_start: datetime, window_end: datetime
    ) -> CutFile | None: ...


class WholeClipCutter:
    """Releases the whole stored clip (no cut): the behaviour before the frame-exact cut.

    The stored clip's recorded SHA-256 is the plaintext hash; delivery checks the bytes it
    encrypted against it, so a vault altered since recording never leaves with a manifest.
    Stored clips carry no clock state yet, so ``clock_synchronized`` is False (nothing vouches
    for it) unless the vault's record says otherwise.
    """

    def __init__(self, vault: ClipVault) -> None:
        self._vault = vault

    def cut(self, clip_id: str, window_start: datetime, window_end: datetime) -> CutFile:
        """The stored clip ``clip_id`` as it is."""
        clip = next(
            (c for c in self._vault.clips_overlapping(window_start, window_end) if c.id == clip_id),
            None,
        )
        if clip is None or clip.sha256 is None:
            raise VaultError(f"clip {clip_id} is no longer stored for this window")
        stream = self._vault.open_clip(clip_id)
        return CutFile(
            stream=stream,
            start=clip.start,
            end=clip.end,
            frames=clip.frames,
            content_type=clip.content_type,
            source_sha256=clip.sha256,
            clock_synchronized=bool(getattr(clip, "clock_synchronized", False)),
            whole=True,
        )
