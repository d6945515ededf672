"""Clock synchronisation: pure parsing and decision, the two probes, and the status text."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent.clock import (
    MAXERROR_LIMIT_US,
    STA_UNSYNC,
    UNKNOWN_NOTE,
    UNSYNCHRONISED_NOTE,
    ClockState,
    clock_state,
    parse_timedatectl,
    probe_adjtimex,
    probe_timedatectl,
    status_json,
    status_line,
    status_text,
    synchronised_from_adjtimex,
)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("yes\n", True),
        ("no\n", False),
        ("  YES ", True),
        ("", None),
        ("maybe\n", None),
        ("NTPSynchronized=yes\n", None),  # not --value output: refuse to guess
    ],
)
def test_parse_timedatectl(output: str, expected: bool | None) -> None:
    assert parse_timedatectl(output) is expected


def test_adjtimex_decision() -> None:
    # Flag clear: an NTP client vouches for the clock.
    assert synchronised_from_adjtimex(0, 1_000) is True
    # Never synchronised since boot: the kernel's own state on a Pi without network.
    assert synchronised_from_adjtimex(STA_UNSYNC, MAXERROR_LIMIT_US) is False
    # Flag kept set only to keep the kernel off the RTC, but the error estimate is small.
    assert synchronised_from_adjtimex(STA_UNSYNC, 250_000) is True
    # Other status bits do not matter.
    assert synchronised_from_adjtimex(0x2001 | STA_UNSYNC, MAXERROR_LIMIT_US) is False


def test_timedatectl_answer_wins() -> None:
    state = clock_state(timedatectl=lambda: "no\n", adjtimex=lambda: (0, 10))
    assert state == ClockState(False, "timedatectl", "NTPSynchronized=no")


def test_falls_back_to_adjtimex() -> None:
    state = clock_state(timedatectl=lambda: None, adjtimex=lambda: (STA_UNSYNC, 16_000_000))
    assert state.synchronised is False
    assert state.source == "adjtimex"
    assert state.detail == "STA_UNSYNC set, maxerror 16.000 s"
    garbled = clock_state(timedatectl=lambda: "n/a", adjtimex=lambda: (0, 4_000))
    assert garbled.synchronised is True
    assert garbled.source == "adjtimex"


def test_unknown_when_no_probe_answers() -> None:
    state = clock_state(timedatectl=lambda: None, adjtimex=lambda: None)
    assert state.synchronised is None
    assert state.source == "none"


def test_real_adjtimex_probe_reads_without_privilege() -> None:
    reading = probe_adjtimex()
    if reading is None:
        pytest.skip("adjtimex(2) is filtered in this sandbox")
    status, maxerror = reading
    assert maxerror >= 0
    assert isinstance(synchronised_from_adjtimex(status, maxerror), bool)


def _fake_timedatectl(directory: Path, body: str) -> None:
    exe = directory / "timedatectl"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[ "$*" = "show -p NTPSynchronized --value" ] && echo yes', "yes\n"),
        ('[ "$*" = "show -p NTPSynchronized --value" ] && echo no', "no\n"),
        ('echo "System has not been booted with systemd" >&2; exit 1', None),
    ],
)
def test_timedatectl_probe_runs_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, expected: str | None
) -> None:
    _fake_timedatectl(tmp_path, body)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert probe_timedatectl() == expected


def test_timedatectl_probe_without_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert probe_timedatectl() is None


def test_status_text_when_synchronised_is_one_line() -> None:
    state = ClockState(True, "timedatectl", "NTPSynchronized=yes")
    assert status_text(state) == "clock: synchronised (timedatectl: NTPSynchronized=yes)"
    assert status_json(state)["note"] is None


def test_status_text_explains_an_unsynchronised_clock() -> None:
    state = ClockState(False, "adjtimex", "STA_UNSYNC set, maxerror 16.000 s")
    text = status_text(state)
    line, note = text.split("\n")
    assert line == status_line(state)
    assert "NOT synchronised" in line
    assert note == UNSYNCHRONISED_NOTE
    # The note names each time-based check and what stays safe.
    for words in ("not_yet_valid", "retention", "approval timeouts", "nothing leaves"):
        assert words in note
    doc = status_json(state)
    assert json.loads(json.dumps(doc)) == {
        "synchronised": False,
        "source": "adjtimex",
        "detail": "STA_UNSYNC set, maxerror 16.000 s",
        "note": UNSYNCHRONISED_NOTE,
    }


def test_status_text_when_unknown() -> None:
    state = ClockState(None, "none", "neither timedatectl nor adjtimex(2) answered")
    assert status_text(state).endswith(UNKNOWN_NOTE)
    assert status_json(state)["synchronised"] is None
