# Type stubs for the parts of gpiozero 2.x the agent uses (gpiozero ships no type information).
from collections.abc import Callable
from typing import Any

class Device:
    pin_factory: Any
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...

class Button(Device):
    def __init__(
        self,
        pin: int | str | None = ...,
        *,
        pull_up: bool | None = ...,
        active_state: bool | None = ...,
        bounce_time: float | None = ...,
        hold_time: float = ...,
        hold_repeat: bool = ...,
        pin_factory: Any = ...,
    ) -> None: ...
    when_pressed: Callable[[], object] | None
    when_released: Callable[[], object] | None
    when_held: Callable[[], object] | None
    @property
    def is_pressed(self) -> bool: ...
    @property
    def is_held(self) -> bool: ...

class LED(Device):
    def __init__(
        self,
        pin: int | str | None = ...,
        *,
        active_high: bool = ...,
        initial_value: bool | None = ...,
        pin_factory: Any = ...,
    ) -> None: ...
    def on(self) -> None: ...
    def off(self) -> None: ...
    def blink(
        self,
        on_time: float = ...,
        off_time: float = ...,
        n: int | None = ...,
        background: bool = ...,
    ) -> None: ...
    @property
    def is_lit(self) -> bool: ...
