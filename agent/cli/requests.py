"""``doorbell-agent pending`` and ``doorbell-agent requests list``: what has been asked for.

Both read ``requests.db`` directly, so they work while ``run`` is running.
"""

from __future__ import annotations

import argparse
from typing import Final

from agent.approval.decisions import Decision, DecisionLog
from agent.cli.common import add_json_flag, load_config, print_json, require_initialised
from agent.config import Config
from agent.errors import AgentError
from agent.requests.store import RequestRecord, RequestStore
from agent.timeutil import rfc3339
from agent.vault import Vault


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


def pending_handler(args: argparse.Namespace) -> int:
    """Print the pending requests, saying which ones' footage is not held from retention."""
    return _show(args, ["pending"], empty="no pending requests")


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
    held = _held(cfg) if statuses == ["pending"] else None
    if args.json:
        out = [_json(r, stored.get(r.jti)) for r in records]
        if held is not None:
            for entry in out:
                entry["footage_held"] = entry["id"] in held
        print_json(out)
        return 0
    if not records:
        print(empty)
        return 0
    for record in records:
        print(_format(record, stored.get(record.jti)))
        if held is not None and record.jti not in held:
            print(UNHELD_NOTE)
    return 0


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
    if stored is not None and record.status == "pending":
        verb = "approval" if stored.action == "approve" else "denial"
        lines.append(
            f"  decision:    your {verb} (made {rfc3339(stored.made_at)}) is stored; the agent "
            "applies it when it starts"
        )
    return "\n".join(escape(line) for line in lines)
