"""``recording.codec``: impossible combinations refused by ``config check``; the codec in use
and stored bytes per minute shown by ``doorbell-agent status``, never in the retained status."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.camera.frame import Frame
from agent.camera.pipeline import FrameEncoder
from agent.camera.recorder import Recorder, RecordingParams
from agent.cli import main
from agent.cli.status import _camera_lines
from agent.status import status_document
from tests.camera.camera_helpers import MemorySink

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def write_config(tmp_path: Path, camera: str, codec: str, masks: bool = False) -> Path:
    path = tmp_path / "agent.yaml"
    mask = "\n  privacy_masks: [[[0, 0], [0.5, 0], [0.5, 0.5]]]" if masks else ""
    path.write_text(
        f"device_id: front-door\nstate_dir: {tmp_path / 'state'}\n"
        f"camera:\n  source: {camera}\nrecording:\n  codec: {codec}{mask}\n"
    )
    return path


@pytest.mark.parametrize(
    ("camera", "masks", "why"),
    [
        ("synthetic", False, "camera.source synthetic delivers raw frames"),
        ("picamera2", False, "camera.source picamera2 delivers raw frames"),
        ("rtsp://127.0.0.1:8554/door", True, "cannot store privacy-masked footage"),
    ],
)
def test_config_check_explains_impossible_codec_combinations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], camera: str, masks: bool, why: str
) -> None:
    path = write_config(tmp_path, camera, "copy", masks)
    assert main(["--config", str(path), "config", "check"]) == 2
    err = capsys.readouterr().err
    assert "recording.codec: copy" in err and why in err


@pytest.mark.parametrize(
    ("camera", "codec"),
    [("rtsp://127.0.0.1:8554/door", "copy"), ("synthetic", "auto"), ("synthetic", "h264"),
     ("'/dev/video0'", "copy"), ("file:/tmp/door.mp4", "mjpeg")],
)
def test_config_check_accepts_workable_codecs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], camera: str, codec: str
) -> None:
    assert main(["--config", str(write_config(tmp_path, camera, codec)), "config", "check"]) == 0
    assert ": OK" in capsys.readouterr().out


def test_config_rejects_an_unknown_codec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(write_config(tmp_path, "synthetic", "h265")), "config",
                 "check"]) == 2
    assert "recording.codec" in capsys.readouterr().err


def test_status_shows_codec_and_bytes_per_minute_but_the_retained_status_does_not() -> None:
    sink = MemorySink()
    rec = Recorder(sink, RecordingParams(pre_roll=0.0, post_roll=0.0, max_clip=60.0,
                                         merge_gap=0.0), FrameEncoder([], 85, codec="h264"),
                   fps=10.0)
    rng = np.random.default_rng(1)
    for n in range(30):
        image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        rec.push(Frame(n + 1, n / 10, T0 + timedelta(seconds=n / 10), 128, 96, image=image),
                 n < 29)
    rec.close()
    stats = rec.stats()
    (clip,) = sink.clips
    assert stats["codec"] == "h264"
    assert stats["stored_bytes_per_minute"] == round(len(clip.data) * 60 / 2.9)
    snapshot = {"workers": {"camera": {"stats": {"recorder": {**stats, "state": "idle"}}}}}
    lines = _camera_lines(snapshot)
    assert any(line.startswith("storage: h264, ") and "per minute" in line for line in lines)
    retained = status_document("front-door", Ed25519PrivateKey.generate(), online=True, since=T0)
    assert set(retained) <= {"device_id", "online", "kid", "public_jwk", "version", "since",
                             "audit"}
    text = json.dumps(retained)
    assert "h264" not in text and "codec" not in text and "per_minute" not in text
