"""Motion detection against ground-truth synthetic scenes, on decoded and on JPEG frames."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest

from agent.camera.frame import Frame, Image, jpeg_size
from agent.camera.motion import MotionDetector, MotionParams, detection_size, downscale
from agent.camera.synthetic import Scenario, Scene, Subject, scenarios
from agent.config import MotionConfig
from tests.camera.camera_helpers import encode_jpeg, image_frame, jpeg_frame

SCENARIOS = {s.name: s for s in scenarios()}
MakeFrame = Callable[[Image, int], Frame]
FRAME_KINDS: dict[str, MakeFrame] = {"decoded": image_frame, "jpeg": jpeg_frame}


def motion_frames(sc: Scenario, make: MakeFrame, params: MotionParams | None = None) -> list[int]:
    params = params or MotionParams(masks=sc.motion_masks)
    det = MotionDetector(params, sc.scene.width, sc.scene.height)
    return [
        n for n in range(sc.frames) if det.detect_frame(make(sc.scene.render(n), n)).motion
    ]


def events(frames: list[int], gap: int = 5) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n in frames:
        if out and n - out[-1][1] <= gap:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


@pytest.mark.parametrize("kind", FRAME_KINDS)
def test_subject_entering_is_detected_within_three_frames(kind: str) -> None:
    sc = SCENARIOS["subject enters"]
    ((enter, leave),) = sc.events
    hits = motion_frames(sc, FRAME_KINDS[kind])
    assert hits, "the subject was never detected"
    assert enter <= hits[0] <= enter + 2
    assert events(hits) == [(hits[0], hits[-1])]  # one event, not fragments
    assert hits[-1] <= leave + 1


@pytest.mark.parametrize("kind", FRAME_KINDS)
@pytest.mark.parametrize(
    "name",
    [
        "sudden global brightness change",
        "IR switch (darker over 3 frames)",
        "slow lighting ramp",
        "sensor noise only",
        "motion inside a mask",
    ],
)
def test_no_event_scenes_stay_quiet(name: str, kind: str) -> None:
    sc = SCENARIOS[name]
    assert sc.events == ()
    assert motion_frames(sc, FRAME_KINDS[kind]) == []


def test_brightness_step_recalibrates_instead_of_reporting_motion() -> None:
    sc = SCENARIOS["sudden global brightness change"]
    det = MotionDetector(MotionParams(), sc.scene.width, sc.scene.height)
    results = [det.detect_frame(image_frame(sc.scene.render(n), n)) for n in range(sc.frames)]
    step = sc.scene.lighting.changes[0][0]
    assert results[step].recalibrated and not results[step].motion
    assert det.recalibrations == 1
    assert not det.calibrating  # settled again afterwards
    assert not any(r.motion for r in results)


def test_a_subject_in_a_mask_is_seen_once_the_mask_is_removed() -> None:
    sc = SCENARIOS["motion inside a mask"]
    assert motion_frames(sc, image_frame, MotionParams()) != []


def test_objects_below_min_area_are_not_motion() -> None:
    scene = Scene(320, 240, (Subject(20, 60, (0.2, 0.5), (0.8, 0.5), size=(0.01, 0.02)),), seed=9)
    sc = Scenario("speck", scene, 60, 10.0, ())
    assert motion_frames(sc, image_frame, MotionParams(min_area=40)) == []
    assert motion_frames(sc, image_frame, MotionParams(min_area=1, threshold=15)) != []


def test_a_big_lighting_jump_while_a_subject_walks_only_briefly_hides_it() -> None:
    from agent.camera.synthetic import Lighting

    walk = Subject(30, 90, (0.0, 0.55), (1.0, 0.55))
    scene = Scene(320, 240, (walk,), lighting=Lighting(((60, 1, 0.5),)), seed=10)
    hits = motion_frames(Scenario("walk + light", scene, 100, 10.0, ()), image_frame)
    assert 60 not in hits  # the jump itself recalibrates
    assert any(n > 62 for n in hits)  # and the walker is found again right after


def test_detection_frame_size_and_reduced_jpeg_decode() -> None:
    assert detection_size(1280, 720, 100) == (178, 100)
    assert detection_size(160, 90, 100) == (160, 90)  # never upscales
    image = Scene(1280, 720, seed=3).render(0)
    frame = jpeg_frame(image, 0)
    small = downscale(frame, (178, 100))
    assert small is not None and small.shape == (100, 178)
    reference = cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), (178, 100),
                           interpolation=cv2.INTER_AREA)
    assert float(np.abs(small.astype(int) - reference.astype(int)).mean()) < 4
    broken = Frame(1, 0.0, frame.wall, 1280, 720, jpeg=b"\xff\xd8garbage")
    assert downscale(broken, (178, 100)) is None
    det = MotionDetector(MotionParams(), 1280, 720)
    assert not det.detect_frame(broken).motion


def test_jpeg_size_reads_the_sof_header() -> None:
    image = np.zeros((48, 64, 3), np.uint8)
    assert jpeg_size(encode_jpeg(image)) == (64, 48)
    ok, progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok and jpeg_size(progressive.tobytes()) == (64, 48)
    assert jpeg_size(b"RIFF....") is None
    assert jpeg_size(b"\xff\xd8\xff\xda\x00\x02") is None  # scan before any SOF
    assert jpeg_size(b"\xff\xd8") is None


def test_params_from_config_and_odd_blur() -> None:
    cfg = MotionConfig(threshold=20, min_area=5, masks=[[[0, 0], [1, 0], [1, 0.1]]])
    p = MotionParams.from_config(cfg)
    assert (p.threshold, p.min_area, p.frame_height) == (20, 5, 100)
    assert len(p.masks) == 1
    with pytest.raises(ValueError, match="odd"):
        MotionDetector(MotionParams(blur=4), 320, 240)


def test_wrong_size_input_is_refused_and_reset_recalibrates() -> None:
    det = MotionDetector(MotionParams(), 320, 240)
    with pytest.raises(ValueError, match="grey image"):
        det.detect(np.zeros((10, 10), np.uint8))
    scene = Scene(320, 240, seed=4)
    for n in range(5):
        det.detect_frame(image_frame(scene.render(n), n))
    assert not det.calibrating
    det.reset()
    assert det.calibrating
