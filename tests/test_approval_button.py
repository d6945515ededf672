"""The physical button and LED, driven through gpiozero's MockFactory, wired to the real
coordinator (store, audit log, vault): press approves the oldest, hold denies, nothing pending is
audited and ignored, debounce, the LED blinks only while something is pending, and the press
confirms an app/CLI approval under ``require: all``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Literal

import pytest
from gpiozero.pins.mock import MockFactory

from agent.approval.button import ButtonPanel
from agent.approval.coordinator import ApprovalCoordinator
from agent.vocabulary import Channel
from tests.test_approval_coordinator import (
    JTI,
    JTI2,
    T0,
    Harness,
    close_harness,
    open_harness,
)

BUTTON_PIN = 17
LED_PIN = 27


class FakeTicks:
    """The panel's monotonic clock, moved by the test (debounce decisions only)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll until ``check`` holds (for gpiozero's own threads), without asserting on time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    f = MockFactory()
    yield f
    f.reset()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = open_harness(tmp_path)
    yield harness
    close_harness(harness)


class Rig:
    """A coordinator and the panel that drives it and shows its pending state."""

    def __init__(
        self,
        h: Harness,
        factory: MockFactory,
        require: Literal["any", "all"] = "any",
        hold_time: float = 30.0,
    ) -> None:
        self.ticks = FakeTicks()
        self.panel: ButtonPanel | None = None
        self.coordinator: ApprovalCoordinator = h.coordinator(require, indicator=self._lit)
        self.panel = ButtonPanel(
            pin=BUTTON_PIN,
            led_pin=LED_PIN,
            hold_time=timedelta(seconds=hold_time),
            bounce_time=timedelta(milliseconds=50),
            on_press=self.coordinator.button_press,
            on_hold=self.coordinator.button_hold,
            pin_factory=factory,
            clock=self.ticks,
        )
        self.button = factory.pin(BUTTON_PIN)
        self.led = factory.pin(LED_PIN)

    def _lit(self, pending: bool) -> None:
        if self.panel is not None:
            self.panel.set_pending(pending)

    def press(self, duration: float = 0.2) -> None:
        """A short press lasting ``duration`` seconds of the panel's clock."""
        self.button.drive_low()
        self.ticks.t += duration
        self.button.drive_high()
        self.ticks.t += 1.0

    def close(self) -> None:
        if self.panel is not None:
            self.panel.close()
        self.coordinator.close()


@pytest.fixture
def rig_factory(h: Harness, factory: MockFactory) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**kwargs: object) -> Rig:
        rig = Rig(h, factory, **kwargs)  # type: ignore[arg-type]
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def led_toggles(rig: Rig) -> int:
    return len(rig.led.states) - 1


def test_short_press_approves_the_oldest_pending_request(
    h: Harness, rig_factory: Callable[..., Rig]
) -> None:
    h.add_request(JTI, received=T0)
    h.add_request(JTI2, received=T0 + timedelta(seconds=10))
    rig = rig_factory()
    rig.coordinator.start()
    rig.press()
    assert h.status(JTI) == "approved" or h.status(JTI) == "delivered"
    assert h.status(JTI2) == "pending"
    assert rig.coordinator.wait_idle(30)
    assert h.status(JTI) == "delivered"
    assert h.entries("request_approved")[0]["channel"] == "button"
    assert h.responses[0] == (JTI, "approved", {"channel": "button", "clips": 0})


def test_holding_denies_the_oldest_and_the_release_does_not_approve(
    h: Harness, rig_factory: Callable[..., Rig]
) -> None:
    h.add_request(JTI, received=T0)
    h.add_request(JTI2, received=T0 + timedelta(seconds=10))
    rig = rig_factory(hold_time=0.2)
    rig.coordinator.start()
    rig.button.drive_low()
    # The coordinator stores the decision, then answers: wait for the answer, not the status.
    assert eventually(lambda: len(h.responses) == 1)
    assert h.status(JTI) == "denied"
    rig.ticks.t += 5
    rig.button.drive_high()
    assert rig.coordinator.wait_idle(30)
    assert h.status(JTI2) == "pending"  # the release after a hold is not a press
    assert h.entries("request_denied")[0]["channel"] == "button"
    assert h.entries("request_approved") == []
    assert h.responses == [(JTI, "denied", {"channel": "button"})]


def test_press_or_hold_with_nothing_pending_is_audited_and_ignored(
    h: Harness, rig_factory: Callable[..., Rig]
) -> None:
    rig = rig_factory(hold_time=0.2)
    rig.coordinator.start()
    rig.press()
    rig.button.drive_low()
    assert eventually(lambda: len(h.entries("button_ignored")) == 2)
    rig.button.drive_high()
    assert [(e["action"], e["reason"]) for e in h.entries("button_ignored")] == [
        ("approve", "nothing pending"),
        ("deny", "nothing pending"),
    ]
    assert h.responses == []
    assert led_toggles(rig) == 0  # the LED never came on


def test_contact_bounce_is_not_a_press(h: Harness, rig_factory: Callable[..., Rig]) -> None:
    h.add_request(JTI)
    rig = rig_factory()
    rig.coordinator.start()
    # blips shorter than bounce_time (50 ms): nothing happens, not even an audit entry
    for _ in range(3):
        rig.press(duration=0.01)
    assert h.status(JTI) == "pending"
    assert h.events() == []
    rig.press(duration=0.08)
    assert h.status(JTI) in ("approved", "delivered")


def test_led_blinks_while_pending_and_is_off_otherwise(
    h: Harness, rig_factory: Callable[..., Rig]
) -> None:
    rig = rig_factory()
    rig.coordinator.start()
    panel = rig.panel
    assert panel is not None

    def blinking() -> bool:
        return panel.blinking

    assert not blinking() and rig.led.state is False
    h.add_request(JTI)
    rig.coordinator.tick()  # the tick notices the new pending request
    assert blinking()
    # the LED actually toggles (gpiozero's blink thread): on, off, on ...
    assert eventually(lambda: led_toggles(rig) >= 3)
    rig.press()
    assert not blinking()
    assert rig.led.state is False
    toggles = led_toggles(rig)
    rig.coordinator.tick()
    assert led_toggles(rig) == toggles and rig.led.state is False


def test_require_all_press_confirms_an_app_approval(
    h: Harness, rig_factory: Callable[..., Rig]
) -> None:
    h.add_request(JTI, received=T0)
    h.add_request(JTI2, received=T0 + timedelta(seconds=10))
    rig = rig_factory(require="all")
    rig.coordinator.start()
    # a press before any app/CLI approval is audited and ignored
    rig.press()
    assert h.status(JTI) == "pending"
    assert h.entries("button_ignored")[0]["reason"].startswith("no request was approved")
    # the newer request is approved in the app: the press confirms that one, not the oldest
    result = rig.coordinator.decide(JTI2, "approve", Channel.APP)
    assert result.awaiting_confirmation
    rig.press()
    assert h.status(JTI2) in ("approved", "delivered")
    assert h.status(JTI) == "pending"
    factors = h.entries("request_approved")[0]["factors"]
    assert [f["channel"] for f in factors] == ["app", "button"]


def test_panel_close_is_idempotent_and_releases_pins(factory: MockFactory) -> None:
    presses: list[str] = []
    panel = ButtonPanel(
        pin=BUTTON_PIN,
        led_pin=None,
        hold_time=timedelta(seconds=1),
        bounce_time=timedelta(0),
        on_press=lambda: presses.append("press"),
        on_hold=lambda: presses.append("hold"),
        pin_factory=factory,
    )
    panel.set_pending(True)  # no LED wired: nothing to blink, no error
    assert not panel.blinking
    factory.pin(BUTTON_PIN).drive_low()
    factory.pin(BUTTON_PIN).drive_high()
    assert presses == ["press"]
    panel.close()
    panel.close()
    # the pin is free again
    again = ButtonPanel(
        pin=BUTTON_PIN,
        led_pin=None,
        hold_time=timedelta(seconds=1),
        bounce_time=timedelta(0),
        on_press=lambda: None,
        on_hold=lambda: None,
        pin_factory=factory,
    )
    again.close()
