"""Typed configs: dataclasses, YAML files and ``key.sub=value`` overrides (the lingua convention).

A stage declares its config as nested dataclasses. :func:`load_config` merges, in order, the
dataclass defaults, a YAML file and command-line overrides with OmegaConf structured configs,
so an unknown key or a value of the wrong type fails before any work starts, naming the key,
where it came from and the keys that are valid there. Dataclasses may define ``validate()``
to check values (ranges, combinations); it is called on every nested config after loading (also
those in dicts and lists), with :func:`config_key` naming its fields by their dotted key there.
:func:`check_range` is the one way to check a number's range. Every string value must be one line:
paths and names end up in sbatch scripts and shell commands, where a newline starts a command.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import hashlib
import json
import math
import typing
from collections.abc import Sequence
from enum import Enum
from typing import Any, TypeVar

import fsspec
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from rnnpipe.pipeline.errors import ConfigError

T = TypeVar("T")


def load_config(schema: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a ``schema`` instance from its defaults, an optional YAML file and overrides.

    ``path`` is read through fsspec; ``overrides`` are ``key.sub=value`` strings whose values
    are parsed as YAML (``n=3``, ``flag=true``, ``paths=[a,b]``). Raises :class:`ConfigError`.
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        loaded = _read_file(path)
        cfg = _merge(schema, cfg, loaded, f"in {path}")
    for item in overrides:
        cfg = _merge(schema, cfg, _parse_override(item), f"from the command line: {item}")
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError("missing required config value(s): " + ", ".join(missing))
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing required config value: {e.full_key}") from e
    except OmegaConfBaseException as e:  # e.g. an ${interpolation} that names no key
        raise ConfigError(f"bad value for config key '{e.full_key or '?'}': {_first_line(e)}") from e
    _validate(obj)
    return obj  # type: ignore[return-value]


def _read_file(path: str) -> DictConfig:
    """The YAML mapping in ``path``; every way it can be unreadable is a :class:`ConfigError`."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from e
    try:
        loaded = OmegaConf.create(text)
    except yaml.YAMLError as e:
        where, why = _yaml_where(e), _yaml_problem(e, lines=True)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {why}") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_first_line(e)}") from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a list")
    return loaded


def _parse_override(item: str) -> DictConfig:
    """One ``key.sub=value`` override as a config; its value is YAML."""
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        # The value's position, counted in the whole override as typed.
        mark = getattr(e, "problem_mark", None)
        where = f" at character {item.index('=') + 2 + mark.column}" if mark and not mark.line else ""
        key, _, value = item.partition("=")
        hint = ""
        if value.lstrip()[:1] in ("`", "@"):
            # Single quotes for the shell (a backtick in double quotes runs a command), double for YAML.
            hint = f" (YAML reserves ` and @ at the start of a value: quote it, as in '{key}=\"{value}\"')"
        raise ConfigError(f"override {item!r} is not valid YAML{where}: {_yaml_problem(e)}{hint}") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {item!r} cannot be parsed: {_first_line(e)}") from e


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _yaml_problem(e: yaml.YAMLError, lines: bool = False) -> str:
    """PyYAML's reason in one line (its str() spans several, with the marks of a string buffer);
    with ``lines``, where the construct it was parsing began when that is another line."""
    if isinstance(e, yaml.MarkedYAMLError):
        context, start, end = e.context, e.context_mark, e.problem_mark
        if context and lines and start is not None and (end is None or start.line != end.line):
            context += f" (from line {start.line + 1}, column {start.column + 1})"
        return "; ".join(p for p in (context, e.problem) if p) or type(e).__name__
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _first_line(e: OmegaConfBaseException) -> str:
    return ((getattr(e, "msg", None) or str(e)).splitlines() or [type(e).__name__])[0]


def _merge(schema: type, base: DictConfig, other: DictConfig, origin: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(schema, e.full_key or str(e.key), origin)) from e
    except OmegaConfBaseException as e:
        key = e.full_key or "?"
        expected = _expected_type(schema, key)
        first = (e.msg or str(e)).splitlines()[0]
        hint = f" (expects {expected})" if expected else ""
        raise ConfigError(f"bad value for config key '{key}'{hint} {origin}: {first}") from e
    assert isinstance(merged, DictConfig)
    return merged


def _unknown_key_message(schema: type, full_key: str, origin: str) -> str:
    parts = full_key.split(".")
    parent_schema: Any = schema
    for part in parts[:-1]:
        fields = _fields(parent_schema)
        if part not in fields:
            break
        parent_schema = fields[part]
    valid = sorted(_fields(parent_schema))
    where = ".".join(parts[:-1]) or "the top level"
    msg = f"unknown config key '{full_key}' {origin}; valid keys at {where}: {', '.join(valid)}"
    close = difflib.get_close_matches(parts[-1], valid, n=1)
    return msg + (f" (did you mean '{close[0]}'?)" if close else "")


def _fields(schema: Any) -> dict[str, Any]:
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return {}
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _expected_type(schema: type, full_key: str) -> str:
    node: Any = schema
    for part in full_key.split("."):
        fields = _fields(node)
        if part not in fields:
            return ""
        node = fields[part]
    if isinstance(node, type) and issubclass(node, Enum):
        return "one of " + ", ".join(m.name for m in node)
    return getattr(node, "__name__", None) or str(node).replace("typing.", "")


# The dotted key of the config whose validate() is running ("model."), for config_key().
_PREFIX: contextvars.ContextVar[str] = contextvars.ContextVar("config_prefix", default="")
# Characters that end a line (or a C string) in the sbatch scripts and shell commands values reach.
_LINE_BREAKS = {"\n": "a newline", "\r": "a carriage return", "\0": "a NUL character"}


def config_key(name: str) -> str:
    """The dotted key of field ``name`` of the config being validated: ``model.n_heads`` while
    ``ModelConfig.validate`` runs for a pretrain config, ``tasks.sst2.max_dev`` for a sweep's task."""
    return _PREFIX.get() + name


def check_range(
    name: str,
    value: float,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    note: str = "",
) -> None:
    """Raise :class:`ConfigError` unless ``value`` (of field ``name``) is a finite number in the
    range the bounds give (``ge <= value``, ``gt < value``, ``value <= le``, ``value < lt``). The
    message names the dotted key, the value and the range, then ``note`` (what 0 or -1 means)."""
    lower = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else ""
    upper = f"{le}]" if le is not None else f"{lt})" if lt is not None else ""
    if lower and upper:
        text = f"in {lower}, {upper}"
    elif lower:
        text = (">= " if ge is not None else "> ") + lower[1:]
    else:
        text = ("<= " if le is not None else "< ") + upper[:-1]
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (ge is None or value >= ge) and (gt is None or value > gt)
    ok = ok and (le is None or value <= le) and (lt is None or value < lt)
    if not ok:
        raise ConfigError(f"{config_key(name)} must be {text}{note}, got {value}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless ``value`` (of field ``name``) is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{config_key(name)} must be {' or '.join(choices)}, got {value!r}")


def _line_break(text: str) -> str:
    """What ends a line in ``text`` ("a newline"), or "" when it is one line."""
    return next((what for char, what in _LINE_BREAKS.items() if char in text), "")


def _validate(obj: Any, prefix: str = "") -> None:
    """Check every value under ``obj`` (at dotted key ``prefix``): strings are one line, nested
    configs (fields, dict values, list items) first, then ``obj.validate()``."""
    if isinstance(obj, str):
        what = _line_break(obj)
        if what:
            key = prefix.rstrip(".") or "a config value"
            raise ConfigError(f"{key}={obj!r} holds {what}; config values must be one line")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            what = _line_break(str(k))
            if what:
                raise ConfigError(f"{prefix.rstrip('.')}: the key {str(k)!r} holds {what}")
            _validate(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _validate(v, f"{prefix.rstrip('.')}[{i}].")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _validate(getattr(obj, f.name), f"{prefix}{f.name}.")
        check = getattr(obj, "validate", None)
        if callable(check):
            token = _PREFIX.set(prefix)
            try:
                check()
            finally:
                _PREFIX.reset(token)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (enums by name), for writing next to every output."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able Python values."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def fingerprint(values: dict[str, Any]) -> str:
    """sha256 over a canonical JSON rendering of ``values``: equal configs, equal fingerprints."""
    blob = json.dumps(values, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def config_from_dict(schema: type[T], values: dict[str, Any], origin: str = "") -> T:
    """A ``schema`` instance from plain values (e.g. a saved config), with the same checks as files."""
    cfg = _merge(
        schema, OmegaConf.structured(schema), OmegaConf.create(values), origin or "in a saved config"
    )
    obj = OmegaConf.to_object(cfg)
    _validate(obj)
    return obj  # type: ignore[return-value]


def override(obj: T, overrides: Sequence[str], origin: str) -> T:
    """A copy of the config ``obj`` with ``key.sub=value`` overrides applied, type-checked and
    validated like a file's (errors name the key and ``origin``)."""
    schema = type(obj)
    base = OmegaConf.structured(obj)
    parsed = [_parse_override(item) for item in overrides]
    try:  # all at once (one copy of the config instead of one per item: a sweep's grid has hundreds)
        cfg = OmegaConf.merge(base, *parsed)
    except OmegaConfBaseException:  # again one by one, for the message naming the item at fault
        cfg = base
        for item, one in zip(overrides, parsed, strict=True):
            cfg = _merge(schema, cfg, one, f"{origin}: {item}")
        raise AssertionError("unreachable: a merge failed together but not one by one") from None
    assert isinstance(cfg, DictConfig)
    out = OmegaConf.to_object(cfg)
    _validate(out)
    return out  # type: ignore[return-value]


def base_config(obj: Any, schema: type[T]) -> T:
    """The ``schema`` part of a config that extends it (a job config minus how it is run)."""
    return schema(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(schema)})


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_model": 128}}`` → ``{"model.d_model": 128}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_ABSENT = "(absent)"


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two configs: ``{"model.d_model": (128, 256)}``;
    a key on one side only has ``"(absent)"`` on the other."""
    a, b = flatten(old), flatten(new)
    return {
        k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(set(a) | set(b))
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    }


def describe_diff(diff: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    """``model.d_model: 128 → 256, model.mixer: lrn → minlstm`` (at most ``limit``, then a count)."""

    def show(v: Any) -> str:
        text = v if isinstance(v, str) else json.dumps(v)
        return text if len(text) <= 40 else text[:18] + "…" + text[-18:]

    items = [f"{k}: {show(a)} → {show(b)}" for k, (a, b) in diff.items()]
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")
