"""Typed configs: dataclasses, YAML files and ``key.sub=value`` overrides (the lingua convention).

A stage declares its config as nested dataclasses. :func:`load_config` merges, in order, the
dataclass defaults, a YAML file and command-line overrides with OmegaConf structured configs,
so an unknown key or a value of the wrong type fails before any work starts, naming the key,
where it came from and the keys that are valid there. Dataclasses may define ``validate()``
to check values (ranges, combinations); it is called on every nested config after loading.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from collections.abc import Sequence
from enum import Enum
from typing import Any, TypeVar

import fsspec
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from pipeline.errors import ConfigError

T = TypeVar("T")


def load_config(schema: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a ``schema`` instance from its defaults, an optional YAML file and overrides.

    ``path`` is read through fsspec; ``overrides`` are ``key.sub=value`` strings whose values
    are parsed as YAML (``n=3``, ``flag=true``, ``paths=[a,b]``). Raises :class:`ConfigError`.
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        try:
            with fsspec.open(path, "r", encoding="utf-8") as f:
                loaded = OmegaConf.create(f.read())
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except OmegaConfBaseException as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not a list")
        cfg = _merge(schema, cfg, loaded, f"in {path}")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r} cannot be parsed: {e}") from e
        cfg = _merge(schema, cfg, dot, f"from the command line: {item}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError("missing required config value(s): " + ", ".join(missing))
    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing required config value: {e.full_key}") from e
    _validate(obj)
    return obj  # type: ignore[return-value]


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


def _validate(obj: Any) -> None:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        _validate(getattr(obj, f.name))
    check = getattr(obj, "validate", None)
    if callable(check):
        check()


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
    cfg = OmegaConf.structured(obj)
    for item in overrides:
        cfg = _merge(schema, cfg, OmegaConf.from_dotlist([item]), f"{origin}: {item}")
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
