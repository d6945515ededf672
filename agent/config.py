"""Configuration: one YAML file loaded into strict, typed, bounded models.

``parse(dict)`` validates a mapping; ``load(path)`` reads YAML, remembers the line of every key
and reports each problem as ``key.path (line N): what is wrong; what is allowed``. Unknown keys
are errors.
Durations are written ``30s``, ``5m``, ``1h``, ``7d``; sizes ``512KiB``, ``2GiB``.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.errors import ConfigError
from agent.timeutil import format_duration, parse_duration, parse_size
from agent.topics import DEFAULT_DISCOVERY_PREFIX, check_discovery_prefix
from agent.vocabulary import Channel

DEFAULT_CONFIG_PATH = Path("/etc/doorbell-agent/agent.yaml")
CONFIG_ENV = "DOORBELL_AGENT_CONFIG"

Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
Size = Annotated[int, BeforeValidator(parse_size)]
Point = tuple[Annotated[float, Field(ge=0.0, le=1.0)], Annotated[float, Field(ge=0.0, le=1.0)]]
Polygon = Annotated[list[Point], Field(min_length=3, max_length=64)]

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraConfig(_Strict):
    """Where frames come from."""

    source: str = Field(
        "synthetic",
        description="V4L2 index or /dev/videoN, rtsp:// or http:// URL, file:PATH, synthetic, "
        "picamera2, rpicam: (the Pi camera through rpicam-vid, extra rpicam-vid arguments may "
        "follow the colon) or pipe:COMMAND (a command writing H.264 to its stdout)",
    )
    stall_timeout: Duration = Field(
        timedelta(seconds=2),
        ge=timedelta(milliseconds=200),
        le=timedelta(minutes=5),
        description="a streaming source silent this long is reported stalled and reopened",
    )
    fps: float = Field(10.0, gt=0, le=60, description="frames per second asked of the source")
    width: int = Field(1280, ge=64, le=4096, description="frame width asked of the source")
    height: int = Field(720, ge=48, le=4096, description="frame height asked of the source")
    loop: bool = Field(True, description="file: sources start again at the end")
    realtime: bool = Field(True, description="file: sources are paced at the file's frame rate")
    jpeg_quality: int = Field(85, ge=30, le=100, description="JPEG quality for frames we encode")
    reopen_backoff_max: Duration = Field(
        timedelta(seconds=30),
        ge=timedelta(seconds=1),
        le=timedelta(minutes=10),
        description="longest wait between attempts to reopen a failed source",
    )
    queue_frames: int = Field(
        8, ge=1, le=120, description="frames held between capture and processing before dropping"
    )

    @field_validator("source")
    @classmethod
    def _source_kind(cls, value: str) -> str:
        if value in ("synthetic", "picamera2") or value.isdigit():
            return value
        if value.startswith(("file:", "rtsp://", "rtsps://", "http://", "https://", "/dev/video",
                             "rpicam:")):
            return value
        if value.startswith("pipe:") and value[len("pipe:"):].strip():
            return value
        raise ValueError(
            "must be a device index (0), /dev/videoN, an rtsp:// or http:// URL, file:PATH, "
            "synthetic, picamera2, rpicam: or pipe:COMMAND"
        )



class MotionConfig(_Strict):
    """Motion detection on a downscaled grey copy of each frame."""

    enabled: bool = Field(True, description="detect motion and record clips")
    frame_height: int = Field(100, ge=50, le=480, description="height in px of the detection frame")
    threshold: int = Field(30, ge=1, le=255, description="grey-level change that counts as motion")
    min_area: int = Field(
        10, ge=1, le=10000, description="smallest moving contour, px at frame_height"
    )
    blur: int = Field(3, ge=1, le=21, description="Gaussian blur kernel (odd)")
    alpha: float = Field(0.01, gt=0, le=0.5, description="background running-average weight")
    global_change: float = Field(
        0.5, gt=0, le=1, description="moving fraction above which the scene recalibrates"
    )
    masks: list[Polygon] = Field(
        default_factory=list, description="polygons ([x, y] fractions 0..1) ignored for motion"
    )

    @field_validator("blur")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be an odd number")
        return value


class RecordingConfig(_Strict):
    """How motion becomes clips."""

    pre_roll: Duration = Field(
        timedelta(seconds=5),
        ge=timedelta(0),
        le=timedelta(seconds=60),
        description="footage kept from before motion starts",
    )
    post_roll: Duration = Field(
        timedelta(seconds=10),
        ge=timedelta(0),
        le=timedelta(minutes=5),
        description="footage kept after motion ends",
    )
    max_clip: Duration = Field(
        timedelta(minutes=2),
        ge=timedelta(seconds=5),
        le=timedelta(hours=1),
        description="longer events are split into clips of at most this length",
    )
    merge_gap: Duration = Field(
        timedelta(seconds=3),
        ge=timedelta(0),
        le=timedelta(minutes=5),
        description="motion gaps shorter than this continue the same clip",
    )
    privacy_masks: list[Polygon] = Field(
        default_factory=list,
        description="polygons ([x, y] fractions 0..1) filled black in every stored frame",
    )
    jpeg_quality: int = Field(85, ge=30, le=100, description="JPEG quality of stored frames")
    codec: Literal["auto", "copy", "h264", "mjpeg"] = Field(
        "auto",
        description="auto: the camera's own compressed stream when it sends one, else H.264 "
        "(hardware where present); copy: only the camera's stream; h264; mjpeg",
    )


class StorageConfig(_Strict):
    """The encrypted clip vault."""

    retention: Duration = Field(
        timedelta(days=7),
        ge=timedelta(hours=1),
        le=timedelta(days=365),
        description="clips older than this are crypto-shredded",
    )
    max_bytes: Size = Field(
        8 * 1024**3,
        ge=16 * 1024**2,
        le=16 * 1024**4,
        description="oldest clips are shredded beyond this total",
    )
    max_held_share: float = Field(
        0.25,
        ge=0.0,
        le=0.5,
        description="share of max_bytes that retention holds of pending requests may keep; a "
        "request whose hold would exceed it stays pending with its footage unheld",
    )
    cipher: Literal["auto", "aes-256-gcm", "chacha20-poly1305"] = Field(
        "auto", description="auto: AES-GCM with CPU AES instructions, else ChaCha20-Poly1305"
    )


class MQTTTLSConfig(_Strict):
    """TLS towards the broker."""

    enabled: bool = Field(False, description="connect with TLS")
    cafile: Path | None = Field(None, description="CA bundle that signed the broker certificate")
    certfile: Path | None = Field(None, description="client certificate (optional)")
    keyfile: Path | None = Field(None, description="client certificate key (optional)")

    @model_validator(mode="after")
    def _pair(self) -> MQTTTLSConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        return self


class MQTTConfig(_Strict):
    """The broker requests arrive through."""

    host: str = Field("127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port")
    tls: MQTTTLSConfig = Field(default_factory=MQTTTLSConfig)
    username: str | None = Field(None, description="broker user name")
    password_file: Path | None = Field(None, description="file holding the broker password")
    topic_prefix: str = Field("doorbell", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    keepalive: Duration = Field(
        timedelta(seconds=30),
        ge=timedelta(seconds=5),
        le=timedelta(minutes=10),
        description="MQTT keep-alive interval",
    )
    session_expiry: Duration = Field(
        timedelta(days=7),
        ge=timedelta(minutes=1),
        le=timedelta(days=30),
        description="how long the broker keeps our session (and queued requests) while offline",
    )
    client_id: str | None = Field(
        None,
        max_length=128,
        description="default doorbell-agent-<id>-<random suffix made at init, in the state dir>",
    )


class RequestsConfig(_Strict):
    """Limits on incoming footage requests (§3)."""

    max_bytes: Size = Field(8192, ge=512, le=65536, description="largest request accepted")
    max_window: Duration = Field(
        timedelta(hours=1),
        ge=timedelta(minutes=1),
        le=timedelta(days=1),
        description="longest footage window one request may ask for",
    )
    max_lifetime: Duration = Field(
        timedelta(days=7),
        ge=timedelta(minutes=1),
        le=timedelta(days=30),
        description="longest exp - iat accepted",
    )
    clock_skew: Duration = Field(
        timedelta(seconds=300),
        ge=timedelta(0),
        le=timedelta(hours=1),
        description="how far in the future iat may be",
    )
    rate_limit: int = Field(10, ge=1, le=1000, description="requests per requester per hour")
    queue_size: int = Field(
        256, ge=8, le=10000, description="incoming messages buffered before dropping"
    )


class ButtonConfig(_Strict):
    """The physical approval button and its LED."""

    enabled: bool = Field(True, description="use the GPIO button when the button channel is on")
    pin: int = Field(17, ge=0, le=53, description="BCM pin of the button (to ground)")
    led_pin: int | None = Field(27, ge=0, le=53, description="BCM pin of the LED, or null")
    hold_time: Duration = Field(
        timedelta(seconds=3),
        ge=timedelta(seconds=1),
        le=timedelta(seconds=30),
        description="holding this long denies instead of approving",
    )
    bounce_time: Duration = Field(
        timedelta(milliseconds=50),
        ge=timedelta(0),
        le=timedelta(seconds=1),
        description="contact debounce",
    )


class ApprovalConfig(_Strict):
    """How the owner approves (§4)."""

    channels: list[Channel] = Field(
        default_factory=lambda: list(Channel),
        min_length=1,
        description="ways the owner may decide",
    )
    require: Literal["any", "all"] = Field(
        "any", description="all: the button AND the app or CLI must approve"
    )
    timeout: Duration = Field(
        timedelta(hours=24),
        ge=timedelta(minutes=1),
        le=timedelta(days=30),
        description="pending requests expire after this",
    )
    confirm_window: Duration = Field(
        timedelta(minutes=5),
        ge=timedelta(seconds=10),
        le=timedelta(hours=1),
        description="with require: all, how long after an app/CLI approval the button confirms",
    )
    button: ButtonConfig = Field(default_factory=ButtonConfig)

    @model_validator(mode="after")
    def _all_needs_two(self) -> ApprovalConfig:
        if len(set(self.channels)) != len(self.channels):
            raise ValueError("channels are listed more than once")
        if self.require == "all" and (
            "button" not in self.channels or not {"app", "cli"} & set(self.channels)
        ):
            raise ValueError("require: all needs the button and the app or cli in channels")
        return self


class AppConfig(_Strict):
    """The owner's local web app."""

    enabled: bool = Field(True, description="serve the local app")
    # The owner's phone reaches the app over the LAN; HTTPS and a password guard it.
    bind: str = Field("0.0.0.0", min_length=1, description="address to listen on")  # noqa: S104
    port: int = Field(8443, ge=1, le=65535, description="HTTPS port")
    session_lifetime: Duration = Field(
        timedelta(hours=12),
        ge=timedelta(minutes=5),
        le=timedelta(days=30),
        description="how long a login lasts",
    )


class DeliveryConfig(_Strict):
    """Release of approved footage (§5)."""

    chunk_bytes: Size = Field(
        256 * 1024, ge=4096, le=16 * 1024**2, description="largest delivery chunk"
    )
    max_inflight: int = Field(16, ge=1, le=1000, description="QoS 1 chunks awaiting PUBACK")
    retries: int = Field(5, ge=0, le=100, description="restarts of a broken delivery before failed")
    max_bytes: Size = Field(
        2 * 1024**3,
        ge=1024**2,
        le=1024**4,
        description="most stored bytes one request may release: an approval (or redeliver) whose "
        "window covers more is refused; the broker must queue this much (§5.2)",
    )


class HomeAssistantConfig(_Strict):
    """Optional Home Assistant MQTT discovery: motion, pending requests, online. Never images."""

    enabled: bool = Field(
        False,
        description="announce motion, the pending-request count and online status to Home "
        "Assistant over MQTT (whoever may read <topic_prefix>/<device_id>/ha/# sees motion)",
    )
    discovery_prefix: str = Field(
        DEFAULT_DISCOVERY_PREFIX, description="Home Assistant's MQTT discovery prefix"
    )

    @field_validator("discovery_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        return check_discovery_prefix(value)


class AuditConfig(_Strict):
    """The two audit logs (§7): checkpoints and the start-up head check."""

    head_interval: Duration = Field(
        timedelta(hours=1),
        ge=timedelta(minutes=1),
        le=timedelta(days=1),
        description="how often the request log records a checkpoint of the activity log, "
        "whatever happened (a fixed cadence, so the public audit head says nothing about "
        "camera activity)",
    )
    head_wait: Duration = Field(
        timedelta(seconds=5),
        ge=timedelta(seconds=1),
        le=timedelta(minutes=1),
        description="how long, after subscribing, the start-up check waits for the retained "
        "audit head before concluding there is none",
    )


class Config(_Strict):
    """The whole agent configuration."""

    device_id: str = Field(..., description="this device's id, used in topics")
    state_dir: Path = Field(Path("/var/lib/doorbell-agent"), description="keys, vault, logs")
    camera: CameraConfig = Field(default_factory=CameraConfig)
    motion: MotionConfig = Field(default_factory=MotionConfig)
    recording: RecordingConfig = Field(default_factory=RecordingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    mqtt: MQTTConfig = Field(default_factory=MQTTConfig)
    requests: RequestsConfig = Field(default_factory=RequestsConfig)
    approval: ApprovalConfig = Field(default_factory=ApprovalConfig)
    app: AppConfig = Field(default_factory=AppConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        if not _ID_RE.match(value):
            raise ValueError("must be 1-64 characters of A-Z a-z 0-9 _ -")
        return value

    @model_validator(mode="after")
    def _codec_fits_camera(self) -> Config:
        problem = codec_problem(self.recording.codec, self.camera.source,
                                bool(self.recording.privacy_masks))
        if problem is not None:
            raise ValueError(problem)
        return self


_RAW_SOURCES = ("synthetic", "picamera2")


def codec_problem(codec: str, source: str, masked: bool) -> str | None:
    """Why ``recording.codec`` cannot work with this camera, or None when it can."""
    if codec != "copy":
        return None
    if masked:
        return (
            "recording.codec: copy cannot store privacy-masked footage (a mask must be burned "
            "into the pixels, which means encoding); use auto or h264"
        )
    if source in _RAW_SOURCES:
        return (
            f"recording.codec: copy needs a camera that sends a compressed stream, but "
            f"camera.source {source} delivers raw frames; use auto or h264"
        )
    return None


def parse(
    data: Any, *, source: str = "<config>", lines: dict[tuple[str, ...], int] | None = None
) -> Config:
    """Validate a mapping into a :class:`Config`; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    try:
        return Config.model_validate(data)
    except RecursionError:
        raise ConfigError(
            f"{source}: the configuration nests too deeply or refers to itself"
        ) from None
    except ValidationError as exc:
        raise ConfigError(
            f"{source} is not a valid configuration",
            problems=[_describe(err, lines or {}) for err in exc.errors()],
            hint="see config/agent.example.yaml for every key with its allowed values",
        ) from None


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file; errors name key paths and file lines."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {p} does not exist",
            hint="pass --config FILE or set DOORBELL_AGENT_CONFIG",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    lines: dict[tuple[str, ...], int] = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
        if node is not None:
            _collect_lines(node, (), lines)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{p}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise ConfigError(
            f"{p} is not a usable configuration: it nests too deeply or an alias refers to itself"
        ) from None
    except Exception as exc:
        # PyYAML's constructors raise IndexError, ValueError, AttributeError... for malformed
        # tagged scalars (``!!int`` with no digits, a bad ``!!timestamp``) instead of a YAMLError.
        raise ConfigError(f"{p} is not valid YAML: {exc or type(exc).__name__}") from None
    if data is None:
        data = {}
    return parse(data, source=str(p), lines=lines)


def _collect_lines(node: yaml.Node, path: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, str(key.value))
            out[child] = key.start_mark.line + 1
            _collect_lines(value, child, out)
            out[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_lines(item, (*path, str(i)), out)


def _describe(err: Any, lines: dict[tuple[str, ...], int]) -> str:
    loc = tuple(str(part) for part in err["loc"])
    key = ".".join(loc) or "(top level)"
    line = None
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            line = lines[loc[:n]]
            break
    where = f" (line {line})" if line is not None else ""
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = ".".join(loc[:-1]) or "the top level"
        allowed = ", ".join(sorted(_fields_at(loc[:-1])))
        return f"{key}{where}: unknown key in {parent}; allowed keys: {allowed}"
    if kind == "missing":
        return f"{key}{where}: required key is missing"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    description = _description_at(loc)
    return f"{key}{where}: {msg}" + (f" ({description})" if description else "")


def _model_at(loc: tuple[str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _description_at(loc: tuple[str, ...]) -> str | None:
    if not loc:
        return None
    model = _model_at(loc[:-1])
    if model is None:
        return None
    field = model.model_fields.get(loc[-1])
    return field.description if field else None


def resolve_path(explicit: str | None) -> Path:
    """The config file to use: --config, else $DOORBELL_AGENT_CONFIG, else the system default."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH
