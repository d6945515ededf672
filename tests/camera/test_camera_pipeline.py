"""camera frames → motion → recorder → the real, encrypted vault; then decrypt and check."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.camera.frame import Frame, Image, SystemClock
from agent.camera.media import iter_images, probe, remux
from agent.camera.pipeline import CameraWorker, FrameEncoder, FrameProcessor
from agent.camera.sources import FileSource
from agent.camera.synthetic import scenarios
from agent.config import Config, parse
from agent.vault import Vault
from tests.camera.camera_helpers import (
    decode_jpeg,
    encode_jpeg,
    image_frame,
    jpeg_frame,
    parse_mkv,
)
from tests.camera.legacy_mkv import MatroskaMuxer

PRIVACY = [[0.6, 0.2], [0.95, 0.2], [0.95, 0.9], [0.6, 0.9]]


def config(state: Path, **recording: object) -> Config:
    rec: dict[str, object] = {
        "pre_roll": "2s", "post_roll": "2s", "max_clip": "1m", "merge_gap": "1s",
        "privacy_masks": [PRIVACY],
    }
    rec.update(recording)
    return parse({"device_id": "front-door", "state_dir": str(state), "recording": rec})


def privacy_region(width: int, height: int) -> np.ndarray:
    """The pixels strictly inside the privacy polygon."""
    mask = np.zeros((height, width), np.uint8)
    pts = np.array([[round(x * width), round(y * height)] for x, y in PRIVACY], np.int32)
    cv2.fillPoly(mask, [pts], 255)
    return mask > 0


# Signatures of plaintext media: JPEG (SOI + APP0/APP1 header), Matroska (EBML header with
# its version element), AVI (RIFF....AVI ). Specific enough that ciphertext never matches.
def plaintext_hits(data: bytes) -> list[str]:
    hits = []
    for marker, what in ((b"\xff\xd8\xff\xe0", "JPEG/JFIF"), (b"\xff\xd8\xff\xe1", "JPEG/Exif")):
        i = data.find(marker)
        while i != -1:
            if data[i + 6 : i + 10] in (b"JFIF", b"Exif") and b"\xff\xd9" in data[i:]:
                hits.append(what)
                break
            i = data.find(marker, i + 1)
    i = data.find(b"\x1a\x45\xdf\xa3")
    while i != -1:
        if b"\x42\x86" in data[i + 4 : i + 14] or b"matroska" in data[i : i + 64]:
            hits.append("EBML/Matroska")
            break
        i = data.find(b"\x1a\x45\xdf\xa3", i + 1)
    i = data.find(b"RIFF")
    while i != -1:
        if data[i + 8 : i + 12] in (b"AVI ", b"WEBP"):
            hits.append("RIFF")
            break
        i = data.find(b"RIFF", i + 1)
    return hits


def scan_for_plaintext(*roots: Path, known: list[bytes]) -> list[str]:
    """Every file under ``roots`` holding a media signature or a known plaintext excerpt."""
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file():
                continue
            data = path.read_bytes()
            hits = plaintext_hits(data) + [f"excerpt {i}" for i, k in enumerate(known) if k in data]
            if hits:
                found.append(f"{path}: {', '.join(hits)}")
    return found


MakeFrame = Callable[[Image, int], Frame]


@pytest.mark.parametrize("make", [image_frame, jpeg_frame], ids=["decoded", "mjpeg"])
def test_visitor_recorded_encrypted_masked_and_readable(
    make: MakeFrame, tmp_path: Path, vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    state = tmp_path / "state"
    sc = next(s for s in scenarios() if s.name == "subject enters")
    ((enter, _),) = sc.events
    cfg = config(state)
    processor = FrameProcessor.from_config(cfg, vault, fps=sc.fps)
    frames = [make(sc.scene.render(n), n) for n in range(sc.frames + 40)]
    motion = [f.seq for f in frames if processor.process(f).motion]
    processor.close()
    first_motion, last_motion = motion[0], motion[-1]
    assert enter <= first_motion <= enter + 2

    (info,) = vault.list_clips()
    assert info.state == "final" and info.content_type == "video/x-matroska"
    # Masks force H.264. Pre-roll: at least 2 s (20 frames) before the frame that triggered
    # it, from the keyframe (at most 2 s apart) at or before that; post-roll 2 s.
    assert info.codec == "h264"
    assert frames[first_motion - 40].wall <= info.start <= frames[first_motion - 20].wall
    assert info.end == frames[last_motion + 20].wall
    span = round((info.end - info.start).total_seconds() * sc.fps)
    assert info.frames == span + 1
    assert info.duration == pytest.approx(info.frames / sc.fps)

    # Nothing readable is left on disk: the state directory and temp dirs hold ciphertext only.
    with vault.open_clip(info.id, verify_sha256=True) as reader:
        plain = reader.read()
    assert plain.startswith(b"\x1a\x45\xdf\xa3")
    mkv = parse_mkv(plain)
    assert len(mkv.blocks) == info.frames
    # Presentation times 100 ms apart (blocks come in decode order: B-frames).
    assert sorted(t for t, _ in mkv.blocks) == [i * 100 for i in range(info.frames)]
    excerpts = [mkv.blocks[0][1][:64], mkv.blocks[len(mkv.blocks) // 2][1][:64]]
    assert scan_for_plaintext(state, private_tmp, known=excerpts) == []
    facts = probe(io.BytesIO(plain))
    assert (facts.codec, facts.frames, facts.keyframe_first) == ("h264", info.frames, True)

    region = privacy_region(sc.scene.width, sc.scene.height)
    seen_outside = 0
    decoded = 0
    for _, img in iter_images(io.BytesIO(plain)):
        decoded += 1
        assert img.shape == (sc.scene.height, sc.scene.width, 3)
        assert img[region].max() <= 24, "privacy-masked pixels must be black in every frame"
        seen_outside += int(img[~region].mean() > 50)
    assert seen_outside == decoded == info.frames  # the rest of the picture is there

    thumb = vault.read_thumbnail(info.id)
    assert thumb is not None
    t_img = decode_jpeg(thumb)
    t_region = cv2.resize(region.astype(np.uint8), (t_img.shape[1], t_img.shape[0])) > 0
    assert t_img[t_region].max() <= 4

    audit_lines = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in audit_lines] == ["clip_recorded"]

    # The owner's decrypted export is a standard file OpenCV and ffprobe open, with its
    # duration and frame count.
    export = tmp_path / "export.mkv"
    remux(io.BytesIO(plain), export, frames=info.frames)
    cap = cv2.VideoCapture(str(export))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert count == info.frames
    if shutil.which("ffprobe"):
        out = subprocess.run(
            ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json",
             str(export)], capture_output=True, text=True, check=True,
        )
        (stream,) = json.loads(out.stdout)["streams"]
        assert stream["codec_name"] == "h264" and int(stream["nb_read_frames"]) == count
        assert stream["tags"]["NUMBER_OF_FRAMES"] == str(count)


def test_mjpeg_frames_are_stored_as_the_cameras_own_bytes(tmp_path: Path, vault: Vault) -> None:
    cfg = config(tmp_path / "state", privacy_masks=[])
    sc = next(s for s in scenarios() if s.name == "subject enters")
    processor = FrameProcessor.from_config(cfg, vault, fps=sc.fps)
    frames = [jpeg_frame(sc.scene.render(n), n) for n in range(sc.frames)]
    for f in frames:
        processor.process(f)
    processor.close()
    (info,) = vault.list_clips()
    with vault.open_clip(info.id) as reader:
        blocks = parse_mkv(reader.read()).blocks
    by_bytes = {f.jpeg: f.seq for f in frames}
    seqs = [by_bytes[b] for _, b in blocks]  # every stored frame is a camera frame, unchanged
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    encoder = processor.recorder.encode
    assert isinstance(encoder, FrameEncoder)
    assert encoder.encoded == 0 and encoder.passed_through > 0


def test_quiet_scenes_record_nothing(tmp_path: Path, vault: Vault) -> None:
    for sc in scenarios():
        if sc.events:
            continue
        cfg = parse({
            "device_id": "d", "state_dir": str(tmp_path / "state"),
            "motion": {"masks": [list(map(list, m)) for m in sc.motion_masks]},
        })
        processor = FrameProcessor.from_config(cfg, vault, fps=sc.fps)
        for n in range(sc.frames):
            processor.process(image_frame(sc.scene.render(n), n))
        processor.close()
        assert processor.events == 0, sc.name
    assert vault.list_clips() == []


def test_motion_disabled_records_nothing(tmp_path: Path, vault: Vault) -> None:
    cfg = parse({"device_id": "d", "state_dir": str(tmp_path / "s"), "motion": {"enabled": False}})
    sc = next(s for s in scenarios() if s.name == "subject enters")
    processor = FrameProcessor.from_config(cfg, vault, fps=sc.fps)
    for n in range(sc.frames):
        processor.process(image_frame(sc.scene.render(n), n))
    processor.close()
    assert vault.list_clips() == []
    assert processor.stats()["motion"]["enabled"] is False


def test_camera_worker_runs_a_file_to_its_end_and_reports(tmp_path: Path, vault: Vault) -> None:
    sc = next(s for s in scenarios() if s.name == "subject enters")
    path = tmp_path / "visitor.mkv"
    muxer = MatroskaMuxer(sc.scene.width, sc.scene.height, fps=sc.fps)
    path.write_bytes(muxer.start() + b"".join(
        muxer.add(encode_jpeg(sc.scene.render(n)), n * 100) for n in range(sc.frames)
    ))
    clock = SystemClock()
    source = FileSource(path, clock=clock, loop=False, realtime=False, fallback_fps=10.0)
    processor = FrameProcessor.from_config(config(tmp_path / "state"), vault, fps=sc.fps)
    # A queue as long as the file: the unpaced file must not outrun processing into drops.
    worker = CameraWorker(source, processor, clock=clock, queue_frames=sc.frames)
    stop = threading.Event()
    worker.run(stop)  # returns by itself: the file ended
    worker.close()
    stats = worker.stats()
    assert stats["capture"]["state"] == "ended"
    assert stats["capture"]["frames"] == sc.frames and stats["capture"]["dropped"] == 0
    assert stats["processing"]["frames"] == sc.frames and stats["processing"]["errors"] == 0
    assert stats["motion"]["events"] == 1 and stats["recorder"]["clips"] == 1
    (info,) = vault.list_clips()
    assert info.state == "final"
