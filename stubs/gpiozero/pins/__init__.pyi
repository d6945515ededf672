# Type stubs for gpiozero.pins (see ../__init__.pyi).
from typing import Any

class Factory:
    def close(self) -> None: ...

class Pin:
    @property
    def state(self) -> Any: ...
