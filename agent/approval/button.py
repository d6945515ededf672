"""The physical approval button and its LED (gpiozero).

- The LED blinks while any request is pending and is off otherwise.
- A short press approves the oldest pending request (with ``approval.require: all`` it confirms
  the oldest request already approved in the app or CLI within the confirmation window).
- Holding the button for ``hold_time`` denies the oldest pending request, at the moment the hold
  time is reached (the LED stops blinking if nothing else is pending); releasing afterwards does
  nothing more.
- A press with nothing to decide is audited (``button_ignored``) by the handler and ignored.

Debounce: gpiozero passes ``bounce_time`` to the pin driver, and on top of that a press only
counts once the button has been down for ``bounce_time``: a contact bounce (a blip shorter than
that, at press or at release) is ignored rather than read as a short press, so a bouncing start
of a long press can never approve. Time comes from an injectable monotonic clock.

The pin factory is gpiozero's usual choice (``GPIOZERO_PIN_FACTORY`` or the best available
driver) unless ``pin_factory`` is given (tests pass a ``MockFactory``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from gpiozero import LED, Button
from gpiozero.pins import Factory

from agent.lifecycle import Closing

log = logging.getLogger(__name__)

BLINK_ON = 0.5
BLINK_OFF = 0.5


class ButtonPanel(Closing):
    """A button (to ground, internal pull-up) and an optional LED, wired to two callbacks.

    ``on_press`` runs for a short press, ``on_hold`` when the button has been held for
    ``hold_time``; both run on gpiozero's threads, so they must not raise (exceptions are
    logged). ``set_pending`` drives the LED.
    """

    def __init__(
        self,
        *,
        pin: int,
        led_pin: int | None,
        hold_time: timedelta,
        bounce_time: timedelta,
        on_press: Callable[[], object],
        on_hold: Callable[[], object],
        pin_factory: Factory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_press = on_press
        self._on_hold = on_hold
        self._clock = clock
        self._bounce = bounce_time.total_seconds()
        self._lock = threading.Lock()
        self._pressed_at: float | None = None
        self._held = False
        self._closed = False
        bounce = self._bounce or None
        self.button = Button(
            pin,
            pull_up=True,
            bounce_time=bounce,
            hold_time=hold_time.total_seconds(),
            pin_factory=pin_factory,
        )
        try:
            self.led = LED(led_pin, pin_factory=pin_factory) if led_pin is not None else None
        except BaseException:
            self.button.close()
            raise
        self._pending = False
        self.button.when_pressed = self._pressed
        self.button.when_released = self._released
        self.button.when_held = self._held_down

    # -- LED -------------------------------------------------------------------------------

    def set_pending(self, pending: bool) -> None:
        """Blink the LED while something is pending; switch it off otherwise."""
        with self._lock:
            if self._closed or self.led is None or pending == self._pending:
                self._pending = pending
                return
            self._pending = pending
            if pending:
                self.led.blink(on_time=BLINK_ON, off_time=BLINK_OFF, background=True)
            else:
                self.led.off()

    @property
    def blinking(self) -> bool:
        """Whether the LED is currently blinking (pending requests)."""
        return self.led is not None and self._pending and not self._closed

    # -- button events (gpiozero threads) --------------------------------------------------

    def _pressed(self) -> None:
        with self._lock:
            self._pressed_at = self._clock()
            self._held = False

    def _held_down(self) -> None:
        with self._lock:
            if self._pressed_at is None or self._held:
                return
            self._held = True
        self._call(self._on_hold, "hold")

    def _released(self) -> None:
        with self._lock:
            started, held = self._pressed_at, self._held
            self._pressed_at = None
            self._held = False
            if started is None or held:
                return
            if self._clock() - started < self._bounce:
                log.debug("button blip shorter than bounce_time ignored")
                return
        self._call(self._on_press, "press")

    def _call(self, handler: Callable[[], object], what: str) -> None:
        try:
            handler()
        except Exception:
            log.exception("button %s handler failed", what)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Switch the LED off and release the pins. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.led is not None:
            self.led.off()
            self.led.close()
        self.button.close()
