"""``doorbell-agent approve J``, ``deny J`` and ``redeliver J``: the owner's decisions from the
device's shell.

``redeliver J`` (§5.2) sends a delivered, acknowledged or failed (``delivery_error``) request's
window again; it needs the running daemon (which holds the broker connection) and is refused,
exit status 1 saying why, otherwise.

With the daemon running the decision goes over the control socket (``agent.sock``) and takes
effect at once, recorded as channel ``cli``. With the daemon stopped it is stored in
``requests.db`` and applied when the daemon next starts (judged at the moment it was made, so a
request that was still pending then is not lost to its deadline meanwhile). Exit status 1 with a
clear error for an unknown request or one that is not pending.
"""

from __future__ import annotations

import argparse

from agent.approval.control import (
    DaemonUnavailableError,
    send_decision,
    send_redeliver,
    socket_path,
)
from agent.approval.decisions import Action, DecisionLog
from agent.approval.machine import ApprovalState, Policy
from agent.cli.common import load_config, print_json, require_initialised
from agent.config import Config
from agent.errors import ApprovalError
from agent.requests.store import RequestStore
from agent.timeutil import format_duration, rfc3339, utcnow
from agent.vocabulary import Channel, Status


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``approve`` and ``deny`` commands."""
    texts = {
        "approve": (
            "approve a pending request: its footage is encrypted to the requester and sent",
            "Approve the pending request J (its id, the jti, as `doorbell-agent pending` shows). "
            "With approval.require: all, this is the first of two steps: press the button within "
            "approval.confirm_window to confirm.",
        ),
        "deny": (
            "deny a pending request: nothing is sent",
            "Deny the pending request J (its id, the jti, as `doorbell-agent pending` shows).",
        ),
    }
    for action, (summary, description) in texts.items():
        p = sub.add_parser(action, help=summary, description=description)
        p.add_argument("jti", metavar="J", help="the request id (jti)")
        p.add_argument("--json", action="store_true", help="print the outcome as JSON")
        p.set_defaults(func=handler, decide_action=action)
    p = sub.add_parser(
        "redeliver",
        help="send a delivered request's footage again (fresh file ids, attempt + 1)",
        description="Send the footage of request J again, to the same requester and recipient: "
        "for a request that is delivered, acknowledged, or failed with delivery_error. Needs the "
        "same approval channels as a first approval (with approval.require: all, press the "
        "button within approval.confirm_window to confirm). Refused for a revoked requester or "
        "when footage of the window has been deleted since.",
    )
    p.add_argument("jti", metavar="J", help="the request id (jti)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=redeliver_handler)


def redeliver_handler(args: argparse.Namespace) -> int:
    """Ask the running daemon to redeliver request J."""
    cfg = load_config(args)
    require_initialised(cfg)
    try:
        result = send_redeliver(socket_path(cfg.state_dir), args.jti)
    except DaemonUnavailableError:
        raise ApprovalError(
            f"request {args.jti} cannot be redelivered: the agent is not running",
            hint="start the agent (systemctl start doorbell-agent) and run redeliver again",
        ) from None
    if args.json:
        print_json(result)
    elif result.get("awaiting_confirmation"):
        window = format_duration(cfg.approval.confirm_window)
        print(
            f"Request {args.jti}: redelivery recorded. Press the button within {window} to "
            "confirm (approval.require is all)."
        )
    else:
        print(
            f"Request {args.jti}: its footage is being cut, encrypted and sent again "
            "(fresh file ids, a new attempt)."
        )
    return 0


def handler(args: argparse.Namespace) -> int:
    """Apply ``approve``/``deny`` through the daemon, or store it for the daemon's next start."""
    cfg = load_config(args)
    require_initialised(cfg)
    action: Action = "approve" if args.decide_action == "approve" else "deny"
    try:
        result = send_decision(socket_path(cfg.state_dir), args.jti, action)
    except DaemonUnavailableError:
        result = _store_for_later(cfg, args.jti, action)
        result["applied"] = False
    else:
        result["applied"] = True
    if args.json:
        print_json(result)
    else:
        print(_describe(cfg, args.jti, action, result))
    return 0


def _store_for_later(cfg: Config, jti: str, action: Action) -> dict[str, object]:
    policy = Policy.from_settings(
        cfg.approval.channels,
        cfg.approval.require,
        cfg.approval.timeout,
        cfg.approval.confirm_window,
    )
    if Channel.CLI not in policy.channels:
        raise ApprovalError(
            "the cli channel is not enabled in approval.channels",
            hint="add cli to approval.channels in the config, or decide in the app",
        )
    if action == "approve" and policy.require == "all":
        raise ApprovalError(
            "the agent is not running, and with approval.require: all an approval must be "
            "confirmed on the button within approval.confirm_window",
            hint="start the agent (systemctl start doorbell-agent) and approve again",
        )
    now = utcnow()
    with RequestStore.open(cfg.state_dir) as store:
        record = store.get_request(jti)
        if record.status != Status.PENDING:
            raise ApprovalError(f"request {jti} is not pending (it is {record.status})")
        state = ApprovalState(jti, Status.PENDING, record.received_at, record.exp)
        deadline = state.deadline(policy)
        if now >= deadline:
            raise ApprovalError(
                f"request {jti} expired at {rfc3339(deadline)}",
                hint="the agent records the expiry when it starts",
            )
        try:
            DecisionLog(store).queue(jti, action, Channel.CLI, now)
        except ValueError as exc:
            raise ApprovalError(str(exc)) from None
    return {"id": jti, "status": Status.PENDING.value, "queued": action, "made_at": rfc3339(now)}


def _describe(cfg: Config, jti: str, action: Action, result: dict[str, object]) -> str:
    if not result["applied"]:
        verb = "approval" if action == "approve" else "denial"
        return (
            f"The agent is not running: your {verb} of request {jti} is stored and will be "
            "applied when it starts."
        )
    if result.get("awaiting_confirmation"):
        window = format_duration(cfg.approval.confirm_window)
        return (
            f"Request {jti}: approval recorded. Press the button within {window} to confirm "
            "(approval.require is all)."
        )
    status = result.get("status")
    if status == Status.APPROVED:
        return f"Request {jti} approved: its footage is being encrypted and sent."
    return f"Request {jti} {status}."
