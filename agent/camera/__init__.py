"""The camera pipeline: sources, capture, motion detection, recording into the vault.

Modules: :mod:`.frame` (frames, clocks), :mod:`.sources` (V4L2, URL, file, synthetic,
picamera2, rpicam/pipe), :mod:`.avsource` (compressed streams through PyAV, stored as they
come), :mod:`.capture` (capture thread, bounded hand-off, reopen backoff), :mod:`.motion`
(the detector), :mod:`.masks` (motion and privacy polygons), :mod:`.recorder` (clip state
machine, pre-roll, vault writing), :mod:`.media` (the clip writer and reader on PyAV: H.264
encoder, live Matroska muxer, demux/decode, export remux, fragmented MP4), :mod:`.synthetic`
(generated scenes with ground truth), :mod:`.pipeline` (the daemon worker).
"""

from agent.camera.frame import Clock, Frame, SystemClock
from agent.camera.motion import MotionDetector, MotionParams, MotionResult
from agent.camera.pipeline import CameraWorker, FrameEncoder, FrameProcessor
from agent.camera.recorder import ClipPolicy, ClipSink, Recorder, RecordingParams
from agent.camera.sources import Source, source_from_config

__all__ = [
    "CameraWorker",
    "ClipPolicy",
    "ClipSink",
    "Clock",
    "Frame",
    "FrameEncoder",
    "FrameProcessor",
    "MotionDetector",
    "MotionParams",
    "MotionResult",
    "Recorder",
    "RecordingParams",
    "Source",
    "SystemClock",
    "source_from_config",
]
