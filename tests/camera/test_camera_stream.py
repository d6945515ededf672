"""Stream copy: H.264 from a file, from MPEG-TS over HTTP on loopback and from a pipe (the
``rpicam-vid`` path), stored packet for packet with a keyframe-aligned pre-roll."""

from __future__ import annotations

import http.server
import io
import sys
import textwrap
import threading
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from agent.camera.avsource import StreamSource, rpicam_command
from agent.camera.frame import Frame, SystemClock
from agent.camera.media import probe, remux
from agent.camera.pipeline import FrameEncoder, FrameProcessor
from agent.camera.sources import source_from_config
from agent.config import Config, parse
from agent.errors import CameraError
from agent.vault import Vault
from tests.camera.camera_helpers import FakeClock
from tests.camera.test_camera_pipeline import scan_for_plaintext

FPS = 10
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def scene(n: int, moving: bool) -> np.ndarray:
    img = np.full((240, 320, 3), 70, np.uint8)
    cv2.putText(img, "door", (20, 220), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (200, 200, 200), 2)
    if moving:
        x = 20 + (n * 9) % 240
        cv2.rectangle(img, (x, 60), (x + 60, 180), (250, 250, 250), -1)
    return img


def h264_bytes(fmt: str, frames: int, motion: range, *, bframes: int = 2) -> bytes:
    """An H.264 stream (keyframe every 2 s, B-frames) in container ``fmt``, made by PyAV."""
    out = io.BytesIO()
    with av.open(out, mode="w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=FPS, options={
            "preset": "veryfast", "g": str(2 * FPS), "bf": str(bframes), "sc_threshold": "0",
        })
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for n in range(frames):
            frame = av.VideoFrame.from_ndarray(scene(n, n in motion), format="bgr24")
            frame.pts = n
            frame.time_base = Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return out.getvalue()


def source_packets(data: bytes, fmt: str) -> list[tuple[bytes, bool]]:
    with av.open(io.BytesIO(data), mode="r", format=fmt) as container:
        return [(bytes(p), p.is_keyframe) for p in container.demux(container.streams.video[0])
                if p.size]


def stored_packets(vault: Vault, clip_id: str) -> list[tuple[bytes, bool]]:
    with vault.open_clip(clip_id) as reader:
        data = reader.read()
    with av.open(io.BytesIO(data), mode="r") as container:
        return [(bytes(p), p.is_keyframe) for p in container.demux(container.streams.video[0])
                if p.size]


def annexb(packets: list[tuple[bytes, bool]]) -> list[bytes]:
    """Packets reduced to their NAL payloads (MPEG-TS is Annex B, Matroska length-prefixed)."""
    out = []
    for data, _ in packets:
        if data[:4] == b"\x00\x00\x00\x01" or data[:3] == b"\x00\x00\x01":
            nals = [n.lstrip(b"\x00") for n in data.split(b"\x00\x00\x01") if n.strip(b"\x00")]
        else:
            nals, i = [], 0
            while i + 4 <= len(data):
                size = int.from_bytes(data[i : i + 4], "big")
                nals.append(data[i + 4 : i + 4 + size])
                i += 4 + size
        # SPS/PPS/AUD (types 9, 7, 8) are container-dependent: compare slices and SEI.
        out.append(b"".join(n for n in nals if n and n[0] & 0x1F not in (7, 8, 9)))
    return out


def config(state: Path, source: str, codec: str = "auto", **camera: object) -> Config:
    return parse({
        "device_id": "front-door", "state_dir": str(state),
        "camera": {"source": source, "fps": FPS, **camera},
        "recording": {"pre_roll": "1s", "post_roll": "1s", "max_clip": "1m", "merge_gap": "1s",
                      "codec": codec},
    })


def run_source(src: StreamSource, processor: FrameProcessor, limit: int = 10_000) -> int:
    src.open()
    n = 0
    try:
        while n < limit:
            frame = src.read()
            if frame is None:
                break
            processor.process(frame)
            n += 1
    finally:
        processor.close()
        src.close()
    return n


def test_h264_file_is_stored_packet_for_packet_from_a_keyframe(
    tmp_path: Path, vault: Vault
) -> None:
    data = h264_bytes("matroska", 120, range(50, 75))
    path = tmp_path / "door.mkv"
    path.write_bytes(data)
    cfg = config(tmp_path / "state", f"file:{path}", loop=False, realtime=False)
    src = source_from_config(cfg.camera, FakeClock())
    assert isinstance(src, StreamSource)
    processor = FrameProcessor.from_config(cfg, vault, fps=FPS)
    assert run_source(src, processor) == 120
    encoder = processor.recorder.encode
    assert isinstance(encoder, FrameEncoder) and encoder.copied == 120

    (info,) = vault.list_clips()
    assert info.codec == "h264"
    stored = stored_packets(vault, info.id)
    original = source_packets(data, "matroska")
    assert stored[0][1], "a clip starts at a keyframe"
    first = [p for p, _ in original].index(stored[0][0])
    assert [p for p, _ in stored] == [p for p, _ in original[first : first + len(stored)]]
    assert first % 20 == 0 and first <= 50 - FPS  # pre-roll >= 1 s, from the keyframe before
    assert info.frames == len(stored)
    # (A cut in decode order may end on a P-frame shown after B-frames it did not take.)
    assert info.duration is not None
    assert len(stored) / FPS <= info.duration <= (len(stored) + 2) / FPS + 1e-6
    with vault.open_clip(info.id, verify_sha256=True) as reader:
        facts = probe(reader)
    assert (facts.codec, facts.frames, facts.keyframe_first) == ("h264", info.frames, True)
    export = tmp_path / "export.mkv"
    with vault.open_clip(info.id, verify_sha256=True) as reader:
        remux(reader, export, frames=info.frames)
    cap = cv2.VideoCapture(str(export))
    count = 0
    while cap.read()[0]:
        count += 1
    assert count == info.frames
    # Nothing of the footage in plaintext on disk (the source file lives outside the state).
    assert scan_for_plaintext(tmp_path / "state", known=[stored[1][0][:64]]) == []


def test_a_compressed_source_is_re_encoded_when_h264_is_asked_for(
    tmp_path: Path, vault: Vault
) -> None:
    data = h264_bytes("matroska", 80, range(30, 55))
    path = tmp_path / "door.mkv"
    path.write_bytes(data)
    cfg = config(tmp_path / "state", f"file:{path}", "h264", loop=False, realtime=False)
    src = source_from_config(cfg.camera, FakeClock(), decode_all=True)
    assert isinstance(src, StreamSource) and src.decode_all
    processor = FrameProcessor.from_config(cfg, vault, fps=FPS)
    assert run_source(src, processor) == 80
    encoder = processor.recorder.encode
    assert isinstance(encoder, FrameEncoder) and encoder.copied == 0 and encoder.encoded >= 75
    (info,) = vault.list_clips()
    assert info.codec == "h264" and info.frames >= 20
    # Made here: the stored keyframes are not the camera's.
    original = {p for p, key in source_packets(data, "matroska") if key}
    stored = [p for p, key in stored_packets(vault, info.id) if key]
    assert stored and not original & set(stored)


class TSServer:
    """MPEG-TS over HTTP on 127.0.0.1, paced like a live camera (one frame's bytes per tick)."""

    def __init__(self, ts: bytes, chunks: int, interval: float) -> None:
        self.ts = ts
        self.chunks = chunks
        self.interval = interval
        self._stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.end_headers()
                step = -(-len(outer.ts) // outer.chunks)
                for i in range(0, len(outer.ts), step):
                    if outer._stop.wait(outer.interval):
                        return
                    try:
                        self.wfile.write(outer.ts[i : i + step])
                        self.wfile.flush()
                    except OSError:
                        return

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/live.ts"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> TSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_live_mpegts_over_http_is_stored_as_it_comes(tmp_path: Path, vault: Vault) -> None:
    data = h264_bytes("mpegts", 60, range(25, 40))
    # Real time, as a camera sends: the stream's own clock and the wall clock agree.
    with TSServer(data, chunks=60, interval=1 / FPS) as server:
        cfg = config(tmp_path / "state", server.url)
        src = source_from_config(cfg.camera, SystemClock())
        assert isinstance(src, StreamSource) and src.kind == "url"
        processor = FrameProcessor.from_config(cfg, vault, fps=FPS)
        # The server closes the connection at the end: a live stream that broke.
        with pytest.raises(CameraError, match=r"stream ended|stream broke"):
            run_source(src, processor)
    (info,) = vault.list_clips()
    stored = stored_packets(vault, info.id)
    original = source_packets(data, "mpegts")
    assert stored[0][1] and info.codec == "h264" and info.frames == len(stored)
    # Packet for packet: the same coded slices (the containers frame them differently).
    got, want = annexb(stored), annexb(original)
    first = want.index(got[0])
    assert got == want[first : first + len(got)]
    # Frame times come from the stream: 100 ms apart, whatever the network did (a cut in
    # decode order may end on a P-frame shown after up to two B-frames it did not take).
    assert info.duration is not None
    assert len(stored) / FPS <= info.duration <= (len(stored) + 2) / FPS + 1e-6


STAND_IN = textwrap.dedent('''
    """rpicam-vid's stand-in: raw H.264 with inline headers on stdout, like `-o -`."""
    import sys, time
    from fractions import Fraction
    import av, numpy as np
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = 320, 240, "yuv420p"
    ctx.time_base = Fraction(1, 10)
    ctx.gop_size = 10
    ctx.options = {"preset": "ultrafast", "tune": "zerolatency"}
    out = sys.stdout.buffer
    for n in range(int(sys.argv[1])):
        img = np.full((240, 320, 3), 60, np.uint8)
        if n >= 20:
            img[60:180, (n * 9) % 260 : (n * 9) % 260 + 60] = 250
        frame = av.VideoFrame.from_ndarray(img, format="bgr24")
        frame.pts = n
        for packet in ctx.encode(frame):
            out.write(bytes(packet))
        out.flush()
        time.sleep(0.02)
''')


def test_a_pipe_of_raw_h264_like_rpicam_vid_streams(tmp_path: Path, vault: Vault) -> None:
    script = tmp_path / "rpicam_stand_in.py"
    script.write_text(STAND_IN)
    cfg = config(tmp_path / "state", f"pipe:{sys.executable} {script} 50")
    src = source_from_config(cfg.camera, SystemClock())
    assert isinstance(src, StreamSource) and src.kind == "pipe"
    processor = FrameProcessor.from_config(cfg, vault, fps=FPS)
    with pytest.raises(CameraError, match="stream ended"):
        run_source(src, processor)
    assert processor.frames >= 48  # the parser may hold the last access unit back
    (info,) = vault.list_clips()
    assert info.codec == "h264" and info.frames >= 30
    assert stored_packets(vault, info.id)[0][1]


def test_rpicam_source_runs_rpicam_vid_with_h264_to_stdout() -> None:
    cfg = config(Path("/nonexistent"), "rpicam: --hflip")
    src = source_from_config(cfg.camera, FakeClock())
    assert isinstance(src, StreamSource) and src.kind == "pipe"
    assert src.target == rpicam_command(" --hflip", width=1280, height=720, fps=FPS)
    assert src.target.startswith("rpicam-vid -t 0 -n --codec h264 --inline")
    assert src.target.endswith("-o - --hflip")


def test_a_source_that_refuses_names_why(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = StreamSource(f"http://127.0.0.1:{port}/x.ts", kind="url", clock=FakeClock(), fps=FPS,
                       open_timeout=2.0)
    with pytest.raises(CameraError, match="connection refused"):
        src.open()


def test_garbage_from_a_pipe_is_bad_data_and_ffmpeg_says_so_through_logging(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "garbage.py"
    script.write_text("import os, sys\nsys.stdout.buffer.write(os.urandom(200000))\n")
    src = StreamSource(f"{sys.executable} {script}", kind="pipe", clock=FakeClock(), fps=FPS)
    frames: list[Frame] = []
    with pytest.raises(CameraError, match=r"bad data|ended|corrupt|no video"):
        src.open()
        while (frame := src.read()) is not None:
            frames.append(frame)
    src.close()
    assert not any(f.packet is not None and f.packet.keyframe for f in frames)
    assert any(r.name.startswith("libav.") for r in caplog.records)

