"""Storage benchmark: what a minute of footage costs in the vault, and in CPU, per codec path.

Input: ``../shared/data/vtest.avi`` (768x576, 10 fps, MPEG-4 v3), required. One run measures:

1. **Stream copy**, bytes: the camera's own stream stored packet for packet (recorder, muxer,
   encrypted vault) against the source's own video bytes (sum of its packets), for the file's
   MPEG-4 stream and for an H.264 stream made from it (as an RTSP camera would send);
   goal <= 1.05x.
2. **Raw frames to H.264**, bytes and quality: the recorder's encoder (libx264, zero latency,
   keyframe every 2 s) per preset against libx264 ``veryfast`` CRF 23 with its defaults
   (B-frames, lookahead) on the same decoded frames, with PSNR against the source;
   goal <= 1.3x for the default preset.
3. **CPU per frame**: the stream-copy path (demux, decode of reference frames for motion,
   motion, recorder, muxer, vault) against decoding the stream alone (goal <= 1.1x); the raw
   H.264 path (motion, encode, muxer, vault) against the pre-PyAV JPEG pipeline (motion, JPEG
   encode of every frame, muxer, vault) on the same frames (goal <= 1.0x).
4. Peak RSS.

    python bench/storage.py [--frames N]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.camera.avsource import StreamSource  # noqa: E402
from agent.camera.frame import Frame, SystemClock  # noqa: E402
from agent.camera.media import DEFAULT_PRESET, iter_images  # noqa: E402
from agent.camera.motion import MotionDetector, MotionParams  # noqa: E402
from agent.camera.pipeline import FrameEncoder, single_threaded_opencv  # noqa: E402
from agent.camera.recorder import Recorder, RecordingParams  # noqa: E402
from agent.config import MotionConfig  # noqa: E402
from agent.vault import ClipInfo, ClipWriter, Vault  # noqa: E402

VIDEO = ROOT.parent / "shared" / "data" / "vtest.avi"
"""The sample next to the project root (``--video`` points elsewhere)."""
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ALWAYS = RecordingParams(pre_roll=0.0, post_roll=0.0, max_clip=3600.0, merge_gap=0.0)


def decoded(path: Path, limit: int) -> Iterator[np.ndarray]:
    with av.open(str(path)) as c:
        for n, frame in enumerate(c.decode(c.streams.video[0])):
            if n >= limit:
                return
            yield frame.to_ndarray(format="bgr24")


def source_bytes(path: Path, limit: int) -> tuple[int, int, str]:
    """(bytes, frames, codec) of the file's video packets."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        total = frames = 0
        for p in c.demux(stream):
            if p.size and frames < limit:
                total += p.size
                frames += 1
        return total, frames, stream.codec_context.name


def make_h264(path: Path, out: Path, limit: int) -> None:
    """The video as an IP camera would send it: H.264 (High, keyframe every 2 s) in MPEG-TS."""
    with av.open(str(out), "w", format="mpegts") as c:
        s = c.add_stream("libx264", rate=10, options={"preset": "veryfast", "crf": "23",
                                                       "g": "20"})
        s.width, s.height, s.pix_fmt = 768, 576, "yuv420p"
        for n, img in enumerate(decoded(path, limit)):
            f = av.VideoFrame.from_ndarray(img, format="bgr24")
            f.pts, f.time_base = n, Fraction(1, 10)
            c.mux(s.encode(f))
        c.mux(s.encode(None))


def reference_x264(path: Path, limit: int, gop: int | None = None) -> tuple[int, bytes]:
    """libx264 veryfast CRF 23, its defaults (or a keyframe every ``gop`` frames):
    (bytes, Matroska file) of the same frames."""
    buf = io.BytesIO()
    total = 0
    options = {"preset": "veryfast", "crf": "23"}
    if gop is not None:
        options["g"] = str(gop)
    with av.open(buf, "w", format="matroska") as c:
        s = c.add_stream("libx264", rate=10, options=options)
        s.width, s.height, s.pix_fmt = 768, 576, "yuv420p"
        for n, img in enumerate(decoded(path, limit)):
            f = av.VideoFrame.from_ndarray(img, format="bgr24")
            f.pts, f.time_base = n, Fraction(1, 10)
            for p in s.encode(f):
                total += p.size
                c.mux(p)
        for p in s.encode(None):
            total += p.size
            c.mux(p)
    return total, buf.getvalue()


def psnr(path: Path, clip: bytes, limit: int) -> float:
    """Mean PSNR (dB) of a stored clip's frames against the source's."""
    values = [
        cv2.PSNR(src, got)
        for src, (_, got) in zip(decoded(path, limit), iter_images(io.BytesIO(clip)), strict=False)
    ]
    return float(np.mean(values))


class _Clip:
    """One clip being written: into the vault, plaintext kept for the quality check."""

    def __init__(self, sink: _Sink, writer: ClipWriter) -> None:
        self.sink = sink
        self.writer = writer
        self.id = writer.id

    def write(self, data: bytes) -> None:
        self.sink.plain += data
        self.writer.write(data)

    def set_thumbnail(self, jpeg: bytes) -> None:
        self.writer.set_thumbnail(jpeg)

    def finish(
        self, end: datetime, frames: int, *, duration: float | None = None,
        codec: str | None = None,
    ) -> ClipInfo:
        info = self.writer.finish(end, frames, duration=duration, codec=codec)
        self.sink.stored += info.stored_bytes
        return info

    def abort(self) -> None:
        self.writer.abort()


class _Sink:
    """The vault, counting what is stored."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self.plain = bytearray()
        self.stored = 0

    def create_clip(self, start: datetime, content_type: str) -> _Clip:
        return _Clip(self, self.vault.create_clip(start, content_type))


def cpu() -> float:
    """CPU seconds of the whole process (encoder and decoder threads included)."""
    return time.process_time()


def detector() -> MotionDetector:
    return MotionDetector(MotionParams.from_config(MotionConfig()), 768, 576)


def record_frames(
    vault: Vault, path: Path, limit: int, encoder: FrameEncoder
) -> tuple[float, int, bytes]:
    """Decoded frames through motion detection and the recorder (every frame kept):
    (CPU seconds, decode excluded; stored bytes; plaintext clip)."""
    sink = _Sink(vault)
    recorder = Recorder(sink, ALWAYS, encoder, fps=10)
    motion = detector()
    spent = 0.0
    for n, img in enumerate(decoded(path, limit)):
        frame = Frame(n + 1, n / 10, T0 + timedelta(seconds=n / 10), 768, 576, image=img)
        t = cpu()
        motion.detect_frame(frame)
        recorder.push(frame, True)
        spent += cpu() - t
    t = cpu()
    recorder.close()
    spent += cpu() - t
    return spent, sink.stored, bytes(sink.plain)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=795, help="frames of vtest.avi to use")
    parser.add_argument("--video", type=Path, default=VIDEO, help="the sample (vtest.avi)")
    args = parser.parse_args()
    video: Path = args.video
    if not video.exists():
        print(f"{video} is missing (pass --video)", file=sys.stderr)
        return 2
    single_threaded_opencv()
    logging.getLogger("libav").setLevel(logging.ERROR)  # FFmpeg's notes on short inputs
    limit = args.frames
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    vault = Vault(tmp / "state", os.urandom(32))
    minutes = limit / 10 / 60
    print(f"input: {video.name}, {limit} frames (768x576, 10 fps, {limit / 10:.1f} s)")

    # 1. Stream copy ---------------------------------------------------------------------
    ts_path = tmp / "camera.ts"
    make_h264(video, ts_path, limit)
    print("\n1. stream copy: stored bytes per minute vs the source's own")
    copy_cpu: dict[str, tuple[float, int]] = {}
    for name, path in (("MPEG-4 (vtest.avi)", video), ("H.264 (camera.ts)", ts_path)):
        src_bytes, _, codec = source_bytes(path, limit)
        sink = _Sink(vault)
        recorder = Recorder(sink, ALWAYS, FrameEncoder([], 85, codec="auto", fps=10), fps=10)
        motion = detector()
        source = StreamSource(str(path), kind="file", clock=SystemClock(), fps=10,
                              realtime=False)
        t = cpu()
        source.open()
        n = 0
        while n < limit and (frame := source.read()) is not None:
            if frame.image is not None:
                motion.detect_frame(frame)
            recorder.push(frame, True)
            n += 1
        recorder.close()
        source.close()
        spent = cpu() - t
        copy_cpu[name] = (spent, n)
        ratio = sink.stored / src_bytes
        print(f"   {name:20s} {codec:9s} source {src_bytes / minutes / 1e6:6.2f} MB/min, "
              f"stored {sink.stored / minutes / 1e6:6.2f} MB/min (encrypted, Matroska): "
              f"{ratio:.3f}x  goal <= 1.05x {'ok' if ratio <= 1.05 else 'MISSED'}")

    # 3a. CPU: stream copy vs decode alone ------------------------------------------------
    t = cpu()
    with av.open(str(ts_path)) as c:
        frames = sum(1 for _ in c.decode(c.streams.video[0]))
    decode_alone = (cpu() - t) / frames
    spent, n = copy_cpu["H.264 (camera.ts)"]
    per = spent / n
    print("\n3a. CPU per frame, H.264 stream copy (demux, decode for motion, motion, mux, vault)")
    verdict = "ok" if per / decode_alone <= 1.1 else "MISSED"
    print(f"   decode alone {decode_alone * 1e3:.2f} ms, stream-copy path {per * 1e3:.2f} ms: "
          f"{per / decode_alone:.2f}x  goal <= 1.1x {verdict}")

    # 2. Raw frames -> H.264 ----------------------------------------------------------------
    print("\n2. raw frames to H.264: bytes vs libx264 veryfast CRF 23 (defaults), PSNR vs source")
    ref_bytes, ref_clip = reference_x264(video, limit)
    ref_psnr = psnr(video, ref_clip, limit)
    print(f"   reference veryfast CRF 23: {ref_bytes / minutes / 1e6:6.2f} MB/min, "
          f"PSNR {ref_psnr:.2f} dB")
    gop_bytes, gop_clip = reference_x264(video, limit, gop=20)
    print(f"   same with a keyframe every 2 s (what cuts need): "
          f"{gop_bytes / minutes / 1e6:6.2f} MB/min ({gop_bytes / ref_bytes:.2f}x), "
          f"PSNR {psnr(video, gop_clip, limit):.2f} dB")
    results: dict[str, tuple[float, int]] = {}
    for preset in ("ultrafast", "superfast", "veryfast", "faster"):
        enc = FrameEncoder([], 85, codec="h264", fps=10, preset=preset, hardware=False)
        spent, stored, plain = record_frames(vault, video, limit, enc)
        results[preset] = (spent, stored)
        ratio = stored / ref_bytes
        mark = " (default)" if preset == DEFAULT_PRESET else ""
        goal = f"  goal <= 1.3x {'ok' if ratio <= 1.3 else 'MISSED'}" if mark else ""
        print(f"   {preset + mark:20s} {stored / minutes / 1e6:6.2f} MB/min stored: {ratio:.2f}x, "
              f"PSNR {psnr(video, plain, limit):.2f} dB, "
              f"CPU {spent / limit * 1e3:.2f} ms/frame{goal}")

    # 3b. CPU: raw H.264 path vs the old JPEG pipeline --------------------------------------
    jpeg_enc = FrameEncoder([], 85, codec="mjpeg", fps=10)
    jpeg_cpu, jpeg_stored, _ = record_frames(vault, video, limit, jpeg_enc)
    h264_cpu = results[DEFAULT_PRESET][0]
    print("\n3b. CPU per frame, raw frames (motion, encode, mux, vault)")
    print(f"   JPEG pipeline (pre-PyAV) {jpeg_cpu / limit * 1e3:.2f} ms "
          f"({jpeg_stored / minutes / 1e6:.2f} MB/min), H.264 {DEFAULT_PRESET} "
          f"{h264_cpu / limit * 1e3:.2f} ms: {h264_cpu / jpeg_cpu:.2f}x  goal <= 1.0x "
          f"{'ok' if h264_cpu <= jpeg_cpu else 'MISSED'}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n4. peak RSS {peak:.0f} MiB")
    vault.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
