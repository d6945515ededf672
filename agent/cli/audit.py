"""``doorbell-agent audit verify|show``: check and read the two tamper-evident logs (§7).

The request log ``audit.jsonl`` and the camera and owner log ``activity.jsonl`` sit in the state
directory; ``--file`` names a copy of the request log instead (``--activity`` a copy of the
activity log, by default the ``activity.jsonl`` beside it). ``verify`` checks both chains, every
``checkpoint`` of the request log against the activity log, and reports any
``audit_discontinuity`` (a gap found at start) as a failure naming it. It checks with the device
key from the state directory, or with a public key given as ``--public-key`` (JWK, PEM or raw
base64url), so a copy can be checked on another machine without the device's config. A log made
before revision 2 (clip events in ``audit.jsonl``, no activity log, no checkpoints) verifies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.audit import (
    AuditEntry,
    AuditHead,
    parse_head_jws,
    read_entries,
    verify_checkpoints,
    verify_file,
)
from agent.cli.common import add_json_flag, load_config, print_json, require_initialised
from agent.config import Config
from agent.errors import AuditError, UsageError
from agent.keys import load_device_key, parse_public_key
from agent.paths import ACTIVITY_FILE, AUDIT_FILE, StatePaths

LOGS = ("both", "audit", "activity")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``audit`` command group."""
    p = sub.add_parser(
        "audit", help="verify or show the signed, hash-chained audit logs (requests, activity)"
    )
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    verify = asub.add_parser(
        "verify",
        help="check both hash chains, every signature and checkpoint; exit 1 naming the first "
        "bad seq",
        description="Check that every entry of audit.jsonl and activity.jsonl follows the "
        "previous one (seq, prev hash) and is signed by the device key, that every checkpoint "
        "in audit.jsonl matches activity.jsonl, and that no gap was found at start "
        "(audit_discontinuity). Exit 0 with a one-line summary when all holds, 1 naming the "
        "first bad seq or the gap otherwise.",
    )
    _add_file_option(verify)
    _add_activity_option(verify)
    verify.add_argument(
        "--public-key",
        metavar="KEY",
        help="the device public key (JWK or PEM file, or a JWK / raw base64url string) instead "
        "of the device key in the state directory",
    )
    verify.add_argument(
        "--head",
        metavar="JWS",
        help="a signed audit head (the retained P/D/audit/head message, or a file holding it): "
        "also check that the log reaches it, which detects entries cut from the end",
    )
    verify.set_defaults(func=verify_handler)

    show = asub.add_parser(
        "show",
        help="print the entries (not verified: use `audit verify` for that)",
        description="Print the entries of the request log (audit.jsonl), then those of the "
        "activity log (activity.jsonl), as tables, or with --json as one JSON list of the "
        "stored entry objects (request log first). --log picks one log; --file shows one file. "
        "This does not check signatures; run `audit verify` for that.",
    )
    _add_file_option(show)
    show.add_argument(
        "--log",
        choices=LOGS,
        default="both",
        help="which log to show: both (default), audit (requests) or activity (camera, owner)",
    )
    show.add_argument(
        "--since",
        metavar="SEQ",
        type=_positive_int,
        default=1,
        help="show only entries with seq SEQ and later (default 1)",
    )
    add_json_flag(show)
    show.set_defaults(func=show_handler)


def _add_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--file",
        metavar="PATH",
        type=Path,
        help=f"an audit log file (default: {AUDIT_FILE} in the configured state directory)",
    )


def _add_activity_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--activity",
        metavar="PATH",
        type=Path,
        help=f"an activity log file (default: {ACTIVITY_FILE} beside the request log)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("seq numbers start at 1")
    return value


def _log_path(args: argparse.Namespace, cfg: Config | None = None) -> Path:
    if args.file is not None:
        path: Path = args.file
        return path
    return StatePaths((cfg or load_config(args)).state_dir).audit_log


def _read_head_arg(value: str) -> str:
    path = Path(value)
    try:
        is_file = len(value) < 4096 and path.is_file()
    except OSError:
        is_file = False
    if not is_file:
        return value
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the audit head file {path}: {exc}") from None


def verify_handler(args: argparse.Namespace) -> int:
    """Verify the chain and signatures; print the summary (exit 0) or raise naming the bad seq."""
    cfg: Config | None = None
    if args.public_key is not None:
        public_key = parse_public_key(args.public_key)
    else:
        cfg = load_config(args)
        require_initialised(cfg)
        public_key = load_device_key(cfg.state_dir).public_key()
    path = _log_path(args, cfg)
    head: AuditHead | None = None
    if args.head is not None:
        head = parse_head_jws(_read_head_arg(args.head), public_key)
    result = verify_file(path, public_key, head=head)
    hint = (
        "the log was altered, truncated or damaged after that point; keep a copy of it "
        "as evidence before anything appends to it"
    )
    if not result.ok:
        raise AuditError(result.summary(), hint=hint)
    summary = result.summary()
    if head is not None:
        summary += f" (reaches the signed head at seq {head.seq})"
    activity_path: Path = args.activity or path.with_name(ACTIVITY_FILE)
    activity, checkpoints = verify_checkpoints(path, activity_path, public_key)
    if activity is not None and not activity.ok:
        raise AuditError(activity.summary("activity log"), hint=hint)
    if not checkpoints.ok:
        raise AuditError(f"audit log broken at seq {checkpoints.audit_seq}: {checkpoints.reason}")
    if activity is not None:
        summary += f"; {activity.summary('activity log')}"
    if activity is not None or checkpoints.checked:
        summary += f"; {checkpoints.checked} checkpoint(s) match"
    print(summary)
    return 0


def show_handler(args: argparse.Namespace) -> int:
    """Print the entries from --since on, as tables or one JSON list."""
    if args.file is not None:
        logs = [(args.file.name, args.file)]
    else:
        paths = StatePaths(load_config(args).state_dir)
        logs = []
        if args.log in ("both", "audit"):
            logs.append((AUDIT_FILE, paths.audit_log))
        if args.log in ("both", "activity"):
            activity = paths.activity_log
            # A state from before revision 2 has no activity log: nothing to show there.
            if args.log == "activity" or activity.exists():
                logs.append((ACTIVITY_FILE, activity))
    shown = [(name, list(read_entries(path, since=args.since))) for name, path in logs]
    if args.json:
        print_json([entry.to_dict() for _, entries in shown for entry in entries])
        return 0
    titled = len(shown) > 1
    for number, (name, entries) in enumerate(shown):
        if titled:
            print(("\n" if number else "") + f"{name}:")
        if not entries:
            print("no audit entries")
            continue
        print(f"{'SEQ':>6}  {'TIME':<24}  {'EVENT':<22}  DETAILS")
        for entry in entries:
            print(f"{entry.seq:>6}  {entry.ts:<24}  {entry.event:<22}  {_details(entry)}")
    return 0


def _details(entry: AuditEntry) -> str:
    parts = []
    for key, value in sorted(entry.fields.items()):
        text = (
            value
            if isinstance(value, str)
            else json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        )
        parts.append(f"{_printable(key)}={_printable(text)}")
    return " ".join(parts)


def _printable(text: str) -> str:
    # Fields carry requester-supplied text (reasons, case refs): never let it drive the terminal.
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
