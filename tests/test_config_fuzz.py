"""Fuzzing the config loader: whatever the file or mapping, only ConfigError escapes, every
problem line starts with the key path it is about, and a valid change round-trips.

Examples per test come from a Hypothesis profile: ``config-ci`` (1 000, chosen when CI=true) or
``config-dev`` (150) otherwise; the round-trip and top-level tests cap theirs lower (see there).
``bench/fuzz.py`` runs the same tests for minutes. Inputs the fuzzing found that escaped as
other exceptions are kept at the end as plain regression tests.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from agent import config
from agent.errors import ConfigError
from agent.timeutil import parse_duration, parse_size

settings.register_profile(
    "config-ci",
    max_examples=1_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile("config-dev", max_examples=150, deadline=None)
PROFILE = settings.get_profile("config-ci" if os.environ.get("CI") == "true" else "config-dev")

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "agent.example.yaml"
BASE: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())


def model_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path the configuration defines, sections included."""
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        yield path
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from model_paths(ann, path)


def _dig(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        data = getattr(data, part) if isinstance(data, BaseModel) else data[part]
    return data


MODEL_PATHS = frozenset(model_paths(config.Config))
LEAF_PATHS = sorted(p for p in MODEL_PATHS if not isinstance(_dig(BASE, p), dict))


def data_paths(
    data: Any, prefix: tuple[str, ...] = (), seen: frozenset[int] = frozenset()
) -> Iterator[tuple[str, ...]]:
    """Every key path present in ``data`` (list items by index), as the loader names them.

    YAML aliases can make a list contain itself: a container already on the path ends it.
    """
    if id(data) in seen:
        return
    seen = seen | {id(data)}
    if isinstance(data, Mapping):
        items: Any = ((str(k), v) for k, v in data.items())
    elif isinstance(data, list | tuple):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return
    for key, value in items:
        path = (*prefix, key)
        yield path
        yield from data_paths(value, path, seen)


def check_problems(exc: ConfigError, data: Any) -> None:
    """Every problem line starts with a key path (from the input or the model) and says what
    is wrong after it."""
    known = {".".join(p) for p in MODEL_PATHS | set(data_paths(data))}
    assert exc.exit_code == 2
    if not exc.problems:
        assert str(exc)  # a whole-file error (not YAML, unreadable) says what happened
        return
    for line in exc.problems:
        named = [
            k for k in known | {"(top level)"}
            if line.startswith((f"{k}: ", f"{k} (line "))
        ]
        assert named, f"problem names no key path: {line!r}"
        rest = line[len(max(named, key=len)) :]
        assert rest.split(": ", 1)[1].strip(), f"problem says nothing: {line!r}"


def load_text(text: str | bytes) -> config.Config | None:
    """``config.load`` on a file holding ``text``; None when it raised ConfigError (checked)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.yaml"
        path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        try:
            return config.load(path)
        except ConfigError as exc:
            try:
                data = yaml.safe_load(text)
            except Exception:  # text the loader rejected as a whole file
                data = None
            check_problems(exc, data)
            return None


def parse_data(data: Any) -> config.Config | None:
    """``config.parse`` on ``data``; None when it raised ConfigError (checked)."""
    try:
        return config.parse(data)
    except ConfigError as exc:
        check_problems(exc, data)
        return None


def assert_round_trips(cfg: config.Config) -> None:
    """The model dumped to JSON-style data and to YAML reads back as the same model."""
    dumped = cfg.model_dump(mode="json")
    assert config.parse(dumped) == cfg
    assert load_text(yaml.safe_dump(dumped)) == cfg


# --- strategies ----------------------------------------------------------------------------

KEY_NAMES = sorted({part for p in MODEL_PATHS for part in p})
KEYS = st.sampled_from(KEY_NAMES) | st.text(max_size=8)
DURATIONS = st.builds(
    "{}{}".format, st.integers(0, 10_000), st.sampled_from(["ms", "s", "m", "h", "d", "w"])
)
SIZES = st.builds(
    "{}{}".format, st.integers(0, 100_000), st.sampled_from(["", "B", "KiB", "MiB", "GiB", "kB"])
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=16)
    | DURATIONS
    | SIZES
    | st.sampled_from(["synthetic", "auto", "any", "all", "cli", "app", "button", "front-door"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
MAPPINGS = st.dictionaries(KEYS, VALUES, max_size=6)

# Fragments of YAML: structure, tricky scalars, tags, anchors, aliases, documents.
YAML_TOKENS = st.sampled_from(
    [
        "\n", "\n  ", "\n    ", ": ", ":", "- ", "-", "[", "]", "{", "}", ", ", "? ", "#", "'",
        '"', "&a ", "*a", "!!binary ", "!!set ", "!!python/object:os.system ", "!!int ", "!!str ",
        "!!float ", "!!timestamp ", "---\n", "...\n", "%YAML 1.1\n", "|\n  ", ">\n  ", "~",
        "null", "yes", "no", "on", ".nan", ".inf", "-.inf", "0x1F", "0o17", "1e999", "-1",
        "2001-12-14t21:59:43.10-05:00", "30s", "5m", "1h", "7d", "512KiB", "2GiB", "\t", "\\",
        "\x00", "\ufeff", "é", "<<: ", "=",
        *KEY_NAMES,
    ]
)
YAML_TEXT = st.lists(YAML_TOKENS | st.text(max_size=6), max_size=60).map("".join)
NESTED = st.builds(
    lambda n, open_, key: f"{key}: " + open_ * n + {"[": "]", "{": "}"}[open_] * n,
    st.integers(1, 100),
    st.sampled_from(["[", "{"]),
    st.sampled_from(KEY_NAMES),
)


def _valid_values(path: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """Values for one leaf that are often (not always) within its bounds."""
    current = _dig(BASE, path)
    if isinstance(current, bool):
        return st.booleans()
    if isinstance(current, int):
        return st.integers(max(0, current // 4), current * 4 + 4)
    if isinstance(current, float):
        return st.floats(0.0, max(current * 4, 1.0), allow_nan=False)
    if isinstance(current, list):
        return st.just(current)
    if isinstance(current, str) and current[:1].isdigit():
        return DURATIONS | SIZES | st.just(current)
    if isinstance(current, str):
        return st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True) | st.just(current)
    return st.just(current)


@st.composite
def valid_mutations(draw: st.DrawFn) -> dict[str, Any]:
    """The example config with one to three leaves changed."""
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    for path in draw(st.lists(st.sampled_from(LEAF_PATHS), min_size=1, max_size=3)):
        _dig(data, path[:-1])[path[-1]] = draw(_valid_values(path), label=".".join(path))
    return data


# --- the properties ------------------------------------------------------------------------


@settings(PROFILE)
@given(YAML_TEXT | NESTED | st.text(max_size=200))
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    cfg = load_text(text)
    if cfg is not None:
        assert_round_trips(cfg)


@settings(PROFILE)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_config_or_a_config_error(raw: bytes) -> None:
    load_text(raw)


@settings(PROFILE)
@given(MAPPINGS | MAPPINGS.map(lambda extra: {"device_id": "d1", **extra}))
def test_any_mapping_is_a_config_or_a_config_error(data: dict[Any, Any]) -> None:
    cfg = parse_data(data)
    if cfg is not None:
        assert_round_trips(cfg)


# A one-line property: a few hundred examples say all there is to say.
@settings(PROFILE, max_examples=min(PROFILE.max_examples, 200))
@given(st.one_of(VALUES, st.lists(VALUES), st.text()))
def test_a_non_mapping_top_level_is_a_config_error(data: Any) -> None:
    if isinstance(data, dict):
        return
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.parse(data)


# Each example parses the whole config four times (two through YAML, ~40 ms): 400 keep CI near
# 20 s; bench/fuzz.py runs it for minutes.
@settings(PROFILE, max_examples=min(PROFILE.max_examples, 400))
@given(valid_mutations())
def test_a_valid_mutation_round_trips(data: dict[str, Any]) -> None:
    cfg = parse_data(data)
    if cfg is None:
        return  # out of bounds: already checked to name the key path
    assert_round_trips(cfg)
    # and each leaf means what was written
    for path in LEAF_PATHS:
        written, got = _dig(data, path), _dig(cfg, path)
        if isinstance(got, timedelta):
            assert got == parse_duration(written)
        elif isinstance(got, bool | str):
            assert got == written
        elif isinstance(got, int) and isinstance(written, str):
            assert got == parse_size(written)
        elif isinstance(got, int | float):
            assert got == written


# --- what the fuzzing found: concrete cases, kept as regression tests ----------------------


@pytest.mark.parametrize(
    "text",
    [
        "device_id: !!int ",  # PyYAML raises IndexError for an empty tagged int
        "device_id: !!float ''",
        "device_id: !!timestamp 2001-99-99",
        "device_id: " + "[" * 5000,  # deeper than Python's recursion limit
        "device_id: d\ncamera: " + "{a: " * 3000 + "}" * 3000,
        "&a [*a]",  # an alias that contains itself
        "device_id: d\napproval: {timeout: 99999999999999d}",  # beyond timedelta
        "device_id: d\napproval: {timeout: 1e300}",
        "device_id: d\napproval: {timeout: .inf}",
        "device_id: d\napproval: {timeout: .nan}",
    ],
)
def test_found_inputs_are_config_errors(text: str) -> None:
    assert load_text(text) is None


@pytest.mark.parametrize("seconds", [1e20, float("inf"), float("-inf"), float("nan"), 2**64])
def test_out_of_range_durations_name_their_key(seconds: float) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"device_id": "d", "approval": {"timeout": seconds}})
    assert [p.split(":")[0] for p in info.value.problems] == ["approval.timeout"]
