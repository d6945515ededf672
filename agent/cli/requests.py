"""``doorbell-agent pending``, ``requests list`` and ``requests show J``: what has been asked for.

They read ``requests.db`` (and, for what a request would release or has released, the vault
and the audit log) directly, so they work while ``run`` is running. What approving a pending
request would release (the preview, contract §5.1) is for the owner only: it is computed here,
on the device, from the cut's own plan.
"""

from __future__ import annotations

import argparse
from typing import Final

from agent.approval.decisions import Decision, DecisionLog
from agent.audit import read_entries
from agent.camera.media import MediaError
from agent.cli.common import add_json_flag, load_config, print_json, require_initialised
from agent.config import Config
from agent.errors import AgentError
from agent.paths import StatePaths
from agent.release.cut import WindowCutter
from agent.release.preview import Preview, build_preview, clock_length, sentence, size_text
from agent.requests.store import RequestRecord, RequestStore
from agent.timeutil import format_size, rfc3339
from agent.vault import Vault
from agent.vocabulary import Status


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``pending`` command and the ``requests`` group."""
    pending = sub.add_parser(
        "pending",
        help="list requests waiting for your decision",
        description="List the requests waiting for your decision: id (jti), requester, kind, "
        "window, legal basis and the reason, shown verbatim (control characters escaped).",
    )
    add_json_flag(pending)
    pending.set_defaults(func=pending_handler)

    p = sub.add_parser("requests", help="list every recorded request")
    rsub = p.add_subparsers(dest="requests_command", metavar="ACTION", required=True)
    lst = rsub.add_parser(
        "list", help="list every recorded request with its status, oldest first"
    )
    add_json_flag(lst)
    lst.set_defaults(func=list_handler)
    show = rsub.add_parser(
        "show",
        help="one request: what approving it would release, or what was released",
        description="Show request J. While it is pending: exactly what approving it would "
        "release (files, spans, seconds, the stored bytes the window covers as an estimate, "
        "to whom, and whether that exceeds delivery.max_bytes). Once delivered: the files "
        "that left (ids, spans, hashes) and whether the requester acknowledged them.",
    )
    show.add_argument("jti", metavar="J", help="the request id (jti)")
    add_json_flag(show)
    show.set_defaults(func=show_handler)


def pending_handler(args: argparse.Namespace) -> int:
    """Print the pending requests, saying which ones' footage is not held from retention."""
    return _show(args, [Status.PENDING], empty="no pending requests")


def list_handler(args: argparse.Namespace) -> int:
    """Print every recorded request."""
    return _show(args, None, empty="no requests recorded")


def _show(args: argparse.Namespace, statuses: list[str] | None, *, empty: str) -> int:
    cfg = load_config(args)
    require_initialised(cfg)
    with RequestStore.open(cfg.state_dir) as store:
        records = store.list_requests(statuses)
        # Decisions made with `approve`/`deny` while the agent was stopped wait here.
        stored = {d.jti: d for d in DecisionLog(store).queued()}
    held = _held(cfg) if statuses == [Status.PENDING] else None
    previews = _previews(cfg, records) if statuses == [Status.PENDING] else {}
    if args.json:
        out = [_json(r, stored.get(r.jti)) for r in records]
        if held is not None:
            for entry in out:
                entry["footage_held"] = entry["id"] in held
        if statuses == [Status.PENDING]:
            for entry in out:
                preview = previews.get(str(entry["id"]))
                entry["preview"] = None if preview is None else preview.to_json()
        print_json(out)
        return 0
    if not records:
        print(empty)
        return 0
    for record in records:
        print(_format(record, stored.get(record.jti)))
        if held is not None and record.jti not in held:
            print(UNHELD_NOTE)
        if record.jti in previews:
            preview = previews[record.jti]
            print(escape(f"  approving:   {sentence(preview)} ({format_size(preview.stored_bytes)}"
                         f"{', OVER delivery.max_bytes' if preview.exceeds else ''})"))
    return 0


def show_handler(args: argparse.Namespace) -> int:
    """Print one request with its preview (pending) or what left (delivered)."""
    cfg = load_config(args)
    require_initialised(cfg)
    with RequestStore.open(cfg.state_dir) as store:
        record = store.get_request(args.jti)
        stored = {d.jti: d for d in DecisionLog(store).queued()}.get(record.jti)
    preview = (
        _previews(cfg, [record]).get(record.jti) if record.status == Status.PENDING else None
    )
    released = _released(cfg, record.jti)
    acknowledged = record.status == Status.ACKNOWLEDGED or any(
        e["event"] == "delivery_acknowledged" for e in released
    )
    if args.json:
        out = _json(record, stored)
        out["preview"] = None if preview is None else preview.to_json()
        out["released"] = released
        out["acknowledged"] = acknowledged
        print_json(out)
        return 0
    print(_format(record, stored))
    if record.status == Status.PENDING:
        print("\n".join(escape(line) for line in _preview_lines(preview)))
    if released:
        print("\n".join(escape(line) for line in _released_lines(released, acknowledged)))
    return 0


def _previews(cfg: Config, records: list[RequestRecord]) -> dict[str, Preview]:
    """The preview of each request with a window; none when the vault cannot be read."""
    out: dict[str, Preview] = {}
    try:
        with Vault.from_config(cfg) as vault:
            cutter = WindowCutter(vault)
            for record in records:
                if record.window_start is None or record.window_end is None:
                    continue
                out[record.jti] = build_preview(record, cutter, cfg.delivery.max_bytes)
    except (AgentError, MediaError, OSError):
        return out
    return out


def _preview_lines(preview: Preview | None) -> list[str]:
    if preview is None:
        return ["  approving:   (the vault cannot be read: what would be released is unknown)"]
    lines = [
        f"  approving:   {sentence(preview)}",
        f"  to:          {preview.requester_name} ({preview.kind}), key {preview.kid}, "
        f"encrypted to {preview.recipient}",
    ]
    for n, f in enumerate(preview.files, start=1):
        lines.append(
            f"  file {n}:      {rfc3339(f.start)} .. {rfc3339(f.end)}  {clock_length(f.seconds)}"
            f"  {f.frames} frames  from clip {f.clip_id}"
        )
    lines += [
        f"  seconds:     {preview.seconds:.1f}",
        f"  bytes:       {size_text(preview)}",
        f"  preview:     {preview.fingerprint}",
    ]
    return lines


RELEASE_EVENTS: Final = (
    "release_started", "request_delivered", "request_redelivered", "delivery_acknowledged",
)


def _released(cfg: Config, jti: str) -> list[dict[str, object]]:
    """The request log's entries about what left for ``jti`` (oldest first)."""
    path = StatePaths(cfg.state_dir).audit_log
    if not path.exists():
        return []
    try:
        return [
            {"seq": e.seq, "ts": e.ts, "event": e.event, **e.fields}
            for e in read_entries(path)
            if e.event in RELEASE_EVENTS and e.fields.get("jti") == jti
        ]
    except (AgentError, OSError):
        return []


def _released_lines(entries: list[dict[str, object]], acknowledged: bool) -> list[str]:
    lines = []
    for entry in entries:
        event = str(entry["event"])
        files = entry.get("files")
        if isinstance(files, list):
            lines.append(f"  {event}: {entry['ts']} ({len(files)} file(s))")
            for f in files:
                if not isinstance(f, dict):
                    continue
                lines.append(
                    f"    {f.get('id')}  {f.get('start')} .. {f.get('end')}"
                    + (f"  sha256 {f['sha256']}" if f.get("sha256") else "")
                    + (f"  plaintext {f['plaintext_sha256']}" if f.get("plaintext_sha256") else "")
                )
        else:
            count = entry.get("clips")
            lines.append(f"  {event}: {entry['ts']}" + (f" ({count} file(s))" if count else ""))
    lines.append(f"  acknowledged: {'yes' if acknowledged else 'no'}")
    return lines


def _json(record: RequestRecord, stored: Decision | None) -> dict[str, object]:
    out = record.to_json()
    out["stored_decision"] = (
        None if stored is None
        else {"action": stored.action, "made_at": rfc3339(stored.made_at)}
    )
    return out


UNHELD_NOTE: Final = (
    "  footage:     NOT held from retention (held footage is at storage.max_held_share, or the "
    "agent is not running): decide soon or it may be shredded"
)


def _held(cfg: Config) -> set[str] | None:
    """The requests whose footage the vault holds, or None when the vault cannot be read."""
    try:
        with Vault.from_config(cfg) as vault:
            return {h.holder for h in vault.holds()}
    except (AgentError, OSError):
        return None


def escape(text: str) -> str:
    """Text from a requester, made safe for a terminal: non-printable characters escaped."""
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def _format(record: RequestRecord, stored: Decision | None = None) -> str:
    start = rfc3339(record.window_start) if record.window_start else "?"
    end = rfc3339(record.window_end) if record.window_end else "?"
    status = record.status + (f" ({record.error})" if record.error else "")
    basis = record.legal_basis or "?"
    if record.legal_ref:
        basis += f" {record.legal_ref}"
    lines = [
        f"{record.jti}  {status}",
        f"  requester:   {record.requester_id} ({record.kind}) {record.requester_name}",
        f"  window:      {start} .. {end}",
        f"  legal basis: {basis}" + (f"  case: {record.case}" if record.case else ""),
        f"  reason:      {record.reason if record.reason is not None else '?'}",
    ]
    if stored is not None and record.status == Status.PENDING:
        verb = "approval" if stored.action == "approve" else "denial"
        lines.append(
            f"  decision:    your {verb} (made {rfc3339(stored.made_at)}) is stored; the agent "
            "applies it when it starts"
        )
    return "\n".join(escape(line) for line in lines)
