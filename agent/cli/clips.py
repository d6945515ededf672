"""``doorbell-agent clips list|export|delete|verify``: the owner's view of the encrypted vault.

These work while ``run`` is running: the vault index is SQLite in WAL mode and the audit log
is locked per append, so the daemon and this command can share them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from agent.audit import AuditLog
from agent.camera.media import CONTENT_TYPE, MediaError, remux
from agent.cli.common import add_json_flag, load_config, print_json, require_initialised
from agent.config import Config
from agent.errors import AgentError, UsageError
from agent.keys import load_device_key
from agent.paths import StatePaths
from agent.timeutil import format_size, rfc3339
from agent.vault import ClipInfo, Vault


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``clips`` command group."""
    p = sub.add_parser("clips", help="list, export, delete or verify recorded clips")
    csub = p.add_subparsers(dest="clips_command", metavar="ACTION", required=True)

    lst = csub.add_parser(
        "list",
        help="list clips (id, start, end, bytes, state)",
        description="List every clip in the vault, oldest first. `bytes` is the size of the "
        "video; a clip in state `writing` is being recorded (or was cut short by a crash and "
        "is recovered when the daemon next starts).",
    )
    add_json_flag(lst)
    lst.set_defaults(func=list_handler)

    export = csub.add_parser(
        "export",
        help="write your own decrypted copy of a clip",
        description="Decrypt a clip to FILE. The file is written under a temporary name and "
        "renamed into place only once every chunk authenticated and the SHA-256 matched the "
        "one recorded; on any failure nothing is left behind and the exit status is 1.",
    )
    export.add_argument("clip", metavar="ID", help="the clip id (see `clips list`)")
    export.add_argument(
        "-o", "--output", required=True, metavar="FILE", type=Path, help="where to write"
    )
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")
    export.set_defaults(func=export_handler)

    delete = csub.add_parser(
        "delete",
        help="delete a clip now (audited; its key is destroyed first)",
        description="Delete a clip: the deletion is written to the activity log, then the clip's "
        "key is destroyed (crypto-shredding) and its file removed.",
    )
    delete.add_argument("clip", metavar="ID", help="the clip id (see `clips list`)")
    delete.set_defaults(func=delete_handler)

    verify = csub.add_parser(
        "verify",
        help="decrypt and authenticate one clip or all; exit 1 naming any bad clip",
        description="Read every chunk of one clip (or all clips), checking authentication, "
        "size and the recorded SHA-256. Exit 0 with a summary when all hold, 1 naming each "
        "bad clip otherwise.",
    )
    verify.add_argument("clip", metavar="ID", nargs="?", help="only this clip")
    verify.set_defaults(func=verify_handler)


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args)
    require_initialised(cfg)
    return cfg


def _row(clip: ClipInfo) -> str:
    end = rfc3339(clip.end) if clip.state == "final" else "-"
    return f"{clip.id:<30} {rfc3339(clip.start):<24} {end:<24} {clip.size:>12} {clip.state}"


def list_handler(args: argparse.Namespace) -> int:
    """Print the clips in the vault."""
    with Vault.from_config(_config(args)) as vault:
        clips = vault.list_clips()
    if args.json:
        print_json([c.to_json() for c in clips])
        return 0
    if not clips:
        print("no clips recorded")
        return 0
    print(f"{'ID':<30} {'START':<24} {'END':<24} {'BYTES':>12} STATE")
    for clip in clips:
        print(_row(clip))
    total = sum(c.size for c in clips)
    print(f"{len(clips)} clip(s), {format_size(total)}")
    return 0


def export_handler(args: argparse.Namespace) -> int:
    """Decrypt one clip to a file, atomically, checking its SHA-256."""
    target: Path = args.output
    if target.is_dir():
        raise UsageError(f"{target} is a directory; give a file name with -o")
    if target.exists() and not args.force:
        raise AgentError(
            f"{target} exists; refusing to overwrite it", hint="pass --force to replace it"
        )
    with (
        Vault.from_config(_config(args)) as vault,
        vault.open_clip(args.clip, verify_sha256=True) as reader,
    ):
        parent = target.parent if str(target.parent) else Path()
        try:
            fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
        except OSError as exc:
            raise AgentError(f"cannot write to {parent}: {exc.strerror}") from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if reader.info.content_type == CONTENT_TYPE:
                    # A remux, not a byte copy: the export is seekable, so it gets the
                    # Duration and NUMBER_OF_FRAMES the live-written vault copy cannot carry.
                    try:
                        remux(reader, tmp, frames=reader.info.frames or None,
                              duration=reader.info.duration)
                    except MediaError as exc:
                        raise AgentError(f"clip {args.clip} cannot be exported: {exc}") from None
                    reader.read()  # the rest (none): raises TamperError on a bad SHA-256
                else:
                    for chunk in reader.chunks():  # raises TamperError on damage / bad SHA-256
                        out.write(chunk)
                    out.flush()
                os.fsync(out.fileno())
            _place(tmp, target, force=args.force)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        info = reader.info
    print(f"exported clip {info.id} ({info.size} bytes, sha256 {info.sha256}) to {target}")
    return 0


def _place(tmp: Path, target: Path, *, force: bool) -> None:
    """Rename the finished copy into place; without force, never replace a file."""
    try:
        if force:
            tmp.replace(target)
        else:
            # link() fails if target appeared meanwhile, which a rename would silently clobber.
            os.link(tmp, target)
            tmp.unlink()
    except FileExistsError:
        raise AgentError(
            f"{target} exists; refusing to overwrite it", hint="pass --force to replace it"
        ) from None
    except OSError as exc:
        raise AgentError(f"cannot write {target}: {exc.strerror}") from None
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent if str(target.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def delete_handler(args: argparse.Namespace) -> int:
    """Delete one clip (audited as clip_deleted, reason owner)."""
    cfg = _config(args)
    with (
        # Clip events go to the camera and owner log (§7), never to the public request log.
        AuditLog(StatePaths(cfg.state_dir).activity_log, load_device_key(cfg.state_dir)) as audit,
        Vault.from_config(cfg, audit=audit) as vault,
    ):
        info = vault.get_clip(args.clip)
        vault.delete_clip(info.id, "owner")
    print(
        f"deleted clip {info.id} ({rfc3339(info.start)}, {info.size} bytes); its key is destroyed"
    )
    return 0


def verify_handler(args: argparse.Namespace) -> int:
    """Authenticate clips; exit 1 naming each one that fails."""
    with Vault.from_config(_config(args)) as vault:
        report = vault.verify(args.clip)
    for _clip_id, message in report.failures:
        print(f"doorbell-agent: error: {message}", file=sys.stderr)
    skipped = f", {len(report.skipped)} being written skipped" if report.skipped else ""
    if report.failures:
        bad = ", ".join(clip_id for clip_id, _ in report.failures)
        print(f"{len(report.failures)} of {report.checked} clip(s) failed verification: {bad}")
        return 1
    print(f"{report.checked} clip(s) verified, {format_size(report.bytes)}{skipped}")
    return 0
