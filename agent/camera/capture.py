"""The capture thread: reads a source, hands frames over through a bounded queue, and
survives every camera fault.

- The hand-off (:class:`FrameQueue`) never blocks the capture side and never grows: when the
  consumer falls behind, the oldest waiting frame is dropped and counted, so what is processed
  is always recent and memory stays at ``camera.queue_frames`` frames.
- A source that fails to open, breaks or stalls (a read that errors or times out) is closed
  and reopened after a backoff that doubles from ``initial`` up to ``camera.reopen_backoff_max``
  (:class:`Backoff`, pure) and resets once frames flow again. Nothing a camera does can end the
  thread except the stop event.
- :meth:`Capture.stats` exposes state, frame and drop counters and the last error for status.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from agent.camera.frame import Clock, Frame
from agent.camera.sources import Source

log = logging.getLogger(__name__)


class Backoff:
    """Reopen delays: ``initial``, doubling up to ``maximum``; :meth:`reset` after success."""

    def __init__(self, initial: float, maximum: float, factor: float = 2.0) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._next = initial

    def next(self) -> float:
        """The delay before the next attempt (and grow the one after)."""
        delay = self._next
        self._next = min(self._next * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        """Frames flow again: the next failure starts from ``initial``."""
        self._next = self.initial


class FrameQueue:
    """A bounded, drop-oldest hand-off between the capture thread and one consumer."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the frame queue needs room for at least one frame")
        self.capacity = capacity
        self._frames: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.put_count = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)

    def put(self, frame: Frame) -> None:
        """Add a frame without ever blocking; drops (and counts) the oldest when full."""
        with self._cond:
            if len(self._frames) >= self.capacity:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self.put_count += 1
            self._cond.notify()

    def get(self, timeout: float | None = None) -> Frame | None:
        """The oldest waiting frame, or None after ``timeout`` or once closed and empty."""
        with self._cond:
            if not self._frames and not self._closed:
                self._cond.wait(timeout)
            return self._frames.popleft() if self._frames else None

    def drain(self) -> list[Frame]:
        """Everything waiting, oldest first (for the final flush at shutdown)."""
        with self._cond:
            frames = list(self._frames)
            self._frames.clear()
            return frames

    def close(self) -> None:
        """Wake the consumer; later gets return what is left, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """Whether the producer has finished."""
        with self._cond:
            return self._closed


class Capture:
    """Runs a source in its own thread, feeding a :class:`FrameQueue`.

    The same source object is opened again after each failure. ``run(stop)`` returns when
    ``stop`` is set or the source ended for good (a file without loop); either way the queue
    is closed.
    """

    def __init__(
        self,
        source: Source,
        queue: FrameQueue,
        *,
        clock: Clock,
        backoff: Backoff,
        stall_after: float = 10.0,
    ) -> None:
        self.source = source
        self.queue = queue
        self.clock = clock
        self.backoff = backoff
        self.stall_after = stall_after
        self.state = "starting"
        self.description = source.description
        self.frames = 0
        self.opens = 0
        self.failures = 0
        self.last_error: str | None = None
        self.retry_in: float | None = None
        self._last_frame: float | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run :meth:`run` in a thread named ``camera-capture``."""
        thread = threading.Thread(target=self.run, args=(stop,), name="camera-capture", daemon=True)
        self._thread = thread
        thread.start()
        return thread

    def run(self, stop: threading.Event) -> None:
        """Open, read, reopen with backoff, until ``stop`` or the end of a file."""
        try:
            while not stop.is_set():
                if not self._session(stop):
                    break
                if stop.is_set():
                    break
                delay = self.backoff.next()
                self._set(state="backoff", retry_in=delay)
                log.info("reopening %s in %.1f s", self.description, delay)
                stop.wait(delay)
        finally:
            self._set(state="ended" if self.state == "ended" else "stopped", retry_in=None)
            self.queue.close()

    def _session(self, stop: threading.Event) -> bool:
        """One open-read-close cycle; False when the source ended for good."""
        self._set(state="opening", retry_in=None)
        source = self.source
        try:
            source.open()
            self.opens += 1
            self._set(state="streaming")
            first = True
            while not stop.is_set():
                frame = source.read()
                if frame is None:
                    log.info("%s ended", self.description)
                    self._set(state="ended")
                    return False
                self.queue.put(frame)
                with self._lock:
                    self.frames += 1
                    self._last_frame = self.clock.monotonic()
                if first:
                    self.backoff.reset()
                    first = False
            return True
        except Exception as exc:
            # A camera fault of any kind (driver, network, decoder, a bug in a backend) must not
            # end capture: log it, back off, reopen.
            with self._lock:
                self.failures += 1
                self.last_error = str(exc) or type(exc).__name__
            log.warning("camera %s failed: %s", self.description, self.last_error)
            return True
        finally:
            try:
                source.close()
            except Exception as exc:
                log.warning("closing camera %s failed: %s", self.description, exc)

    def _set(self, *, state: str, retry_in: float | None = None) -> None:
        with self._lock:
            self.state = state
            self.retry_in = retry_in

    def stats(self) -> dict[str, Any]:
        """State and counters for status; ``stalled`` when streaming but silent too long."""
        with self._lock:
            age = None if self._last_frame is None else self.clock.monotonic() - self._last_frame
            state = self.state
            if state == "streaming" and age is not None and age > self.stall_after:
                state = "stalled"
            out: dict[str, Any] = {
                "source": self.description,
                "state": state,
                "frames": self.frames,
                "dropped": self.queue.dropped,
                "queued": len(self.queue),
                "opens": self.opens,
                "failures": self.failures,
                "last_error": self.last_error,
                "retry_in": self.retry_in,
                "last_frame_age": None if age is None else round(age, 3),
            }
        try:
            out.update(self.source.stats())
        except Exception as exc:
            log.debug("source stats failed: %s", exc)
        return out
