"""The config loader: strict models, bounded numbers, errors naming key path and line."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from agent import config
from agent.errors import ConfigError
from agent.timeutil import parse_duration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "agent.example.yaml"


def _problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    assert info.value.exit_code == 2
    return info.value.problems


def _load_problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return info.value.problems


def test_example_is_valid_and_lists_every_key() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg.device_id == "front-door"
    data = yaml.safe_load(EXAMPLE.read_text())

    def walk(model: type[BaseModel], section: dict[str, object], path: str) -> None:
        for name, field in model.model_fields.items():
            assert name in section, f"{path}{name} is missing from the example config"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                sub = section[name]
                assert isinstance(sub, dict)
                walk(ann, sub, f"{path}{name}.")

    walk(config.Config, data, "")


def test_defaults_match_contract() -> None:
    cfg = config.parse({"device_id": "d1"})
    assert cfg.mqtt.topic_prefix == "doorbell"
    assert cfg.requests.max_bytes == 8192
    assert cfg.requests.clock_skew == timedelta(seconds=300)
    assert cfg.requests.max_lifetime == timedelta(days=7)
    assert cfg.requests.max_window == timedelta(hours=1)
    assert cfg.requests.rate_limit == 10
    assert cfg.approval.timeout == timedelta(hours=24)
    assert cfg.delivery.chunk_bytes == 256 * 1024
    assert cfg.storage.retention == timedelta(days=7)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("7d", timedelta(days=7)),
        ("250ms", timedelta(milliseconds=250)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    cfg = (
        config.parse({"device_id": "d1", "approval": {"timeout": text}})
        if expected >= timedelta(minutes=1)
        else config.parse({"device_id": "d1", "recording": {"post_roll": text}})
    )
    assert expected in (cfg.approval.timeout, cfg.recording.post_roll)


@pytest.mark.parametrize(
    ("text", "expected"), [("512KiB", 512 * 1024), ("2GiB", 2 * 1024**3), (4096, 4096)]
)
def test_sizes(text: object, expected: int) -> None:
    data = (
        {"device_id": "d1", "storage": {"max_bytes": text}}
        if expected > 2**24
        else {"device_id": "d1", "delivery": {"chunk_bytes": text}}
    )
    cfg = config.parse(data)
    got = cfg.storage.max_bytes if expected > 2**24 else cfg.delivery.chunk_bytes
    assert got == expected


def test_unknown_key_names_path_line_and_allowed(tmp_path: Path) -> None:
    problems = _load_problems(tmp_path, "device_id: d1\ncamera:\n  fps: 10\n  colour: red\n")
    assert len(problems) == 1
    assert problems[0].startswith("camera.colour (line 4): unknown key in camera")
    assert "allowed keys:" in problems[0] and "fps" in problems[0]


def test_unknown_top_level_key(tmp_path: Path) -> None:
    problems = _load_problems(tmp_path, "device_id: d1\ncloud_upload: true\n")
    assert problems[0].startswith("cloud_upload (line 2): unknown key in the top level")


def test_wrong_type_and_out_of_range(tmp_path: Path) -> None:
    problems = _load_problems(
        tmp_path,
        "device_id: d1\nmqtt:\n  port: 70000\nrequests:\n  rate_limit: lots\n",
    )
    joined = "\n".join(problems)
    assert "mqtt.port (line 3): Input should be less than or equal to 65535" in joined
    assert "requests.rate_limit (line 5):" in joined and "integer" in joined


def test_bad_duration_and_size(tmp_path: Path) -> None:
    problems = _load_problems(
        tmp_path, "device_id: d1\nstorage:\n  retention: forever\n  max_bytes: 3 bananas\n"
    )
    joined = "\n".join(problems)
    assert "storage.retention (line 3): 'forever' is not a duration; write it as 30s" in joined
    assert "storage.max_bytes (line 4): '3 bananas' is not a size; write it as 512KiB" in joined


def test_duration_bounds() -> None:
    problems = _problems({"device_id": "d1", "storage": {"retention": "5m"}})
    assert problems[0].startswith("storage.retention: Input should be greater than or equal to")


def test_missing_device_id() -> None:
    assert _problems({}) == ["device_id: required key is missing"]


@pytest.mark.parametrize("bad", ["has space", "", "x" * 65, "slash/y", "plus+"])
def test_device_id_charset(bad: str) -> None:
    problems = _problems({"device_id": bad})
    assert problems[0].startswith("device_id:")


def test_camera_source_kinds() -> None:
    for ok in [
        "synthetic",
        "0",
        "/dev/video2",
        "file:/tmp/x.avi",
        "rtsp://127.0.0.1/s",
        "http://127.0.0.1:81/m",
    ]:
        assert config.parse({"device_id": "d", "camera": {"source": ok}}).camera.source == ok
    problems = _problems({"device_id": "d", "camera": {"source": "ftp://x"}})
    assert "camera.source: must be a device index" in problems[0]


def test_polygons_bounded() -> None:
    square = [[0.1, 0.1], [0.2, 0.1], [0.2, 0.2]]
    cfg = config.parse({"device_id": "d", "recording": {"privacy_masks": [square]}})
    assert cfg.recording.privacy_masks[0][0] == (0.1, 0.1)
    problems = _problems({"device_id": "d", "motion": {"masks": [[[0, 0], [2, 0], [0, 1]]]}})
    assert problems[0].startswith("motion.masks.0.1.0:")
    problems = _problems({"device_id": "d", "motion": {"masks": [[[0, 0], [1, 1]]]}})
    assert "at least 3" in problems[0]


def test_blur_must_be_odd() -> None:
    assert "odd" in _problems({"device_id": "d", "motion": {"blur": 4}})[0]


def test_approval_require_all_needs_two_channels() -> None:
    problems = _problems({"device_id": "d", "approval": {"require": "all", "channels": ["app"]}})
    assert "require: all needs the button" in problems[0]
    problems = _problems({"device_id": "d", "approval": {"channels": ["sms"]}})
    assert problems[0].startswith("approval.channels.0:")


def test_tls_cert_and_key_go_together() -> None:
    problems = _problems({"device_id": "d", "mqtt": {"tls": {"certfile": "/x.pem"}}})
    assert "certfile and keyfile go together" in problems[0]


def test_every_problem_reported_at_once() -> None:
    problems = _problems({"device_id": "d", "camera": {"fps": -1}, "app": {"port": 0}, "x": 1})
    assert len(problems) == 3


def test_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(path)


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("device_id: d\ncamera:\n  fps: [1\n")
    with pytest.raises(ConfigError, match=r"\(line \d+\) is not valid YAML"):
        config.load(path)


def test_missing_file_has_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.yaml")
    assert "does not exist" in info.value.message
    assert info.value.hint is not None and "--config" in info.value.hint


def test_resolve_path_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    assert config.resolve_path(None) == config.DEFAULT_CONFIG_PATH
    monkeypatch.setenv(config.CONFIG_ENV, "/tmp/env.yaml")
    assert config.resolve_path(None) == Path("/tmp/env.yaml")
    assert config.resolve_path("/tmp/cli.yaml") == Path("/tmp/cli.yaml")


def test_models_are_frozen() -> None:
    cfg = config.parse({"device_id": "d"})
    with pytest.raises(ValidationError):
        cfg.camera.fps = 5  # type: ignore[misc]
