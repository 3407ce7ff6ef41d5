"""Typed dataclass configs: YAML loading with strict keys, ``--set a.b=c`` overrides, presets.

One loader for every job (DESIGN.md §6.3): a YAML mapping is turned into the job's dataclass
recursively; an unknown key, a wrong type or a failed ``__post_init__`` check raises
:class:`ConfigError` naming the file and the dotted key. Overrides are parsed as YAML scalars
(``--set clip.num_frames=8``, ``--set co3d.categories=[car,chair]``) and applied before typing,
so they get exactly the same checks as the file.

A YAML file may start from a preset: ``preset: debug`` fills every field from the class's
``debug()`` classmethod, and the rest of the file overrides it.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check/convert ``value`` to type ``tp``; ``where`` is 'file: key' for messages."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}"
        )
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, where)
    if tp is list:
        tp, origin = list[Any], list
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is dict:
        tp, origin = dict[str, Any], dict
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{where}.<key>"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def _from_dict(cls: type[T], data: dict, where: str) -> T:
    """``where`` is ``"<source>"`` at the top level and ``"<source>: a.b"`` below it."""
    source, _, key = where.partition(": ")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            full = f"{key}.{name}" if key else name
            raise ConfigError(
                f"{source}: unknown key {full!r} (valid keys of {cls.__name__}: {', '.join(sorted(fields))})"
            )
    kwargs = {
        name: _coerce(value, hints[name], f"{source}: {key + '.' if key else ''}{name}")
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg) -> dict:
    """The config as plain data (lists, not tuples), ready for YAML or MLflow params."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (for MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _apply_override(data: dict, override: str, source: str) -> None:
    if "=" not in override:
        raise ConfigError(f"{source}: override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{source}: override {override!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: override {override!r}: value is not valid YAML ({e})") from None
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: override {override!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(
    cls: type[T], data: dict, source: str = "<dict>", overrides: list[str] | tuple[str, ...] = ()
) -> T:
    """Build ``cls`` from a mapping (with an optional ``preset`` key) plus overrides."""
    data = dict(data or {})
    for ov in overrides:
        _apply_override(data, ov, "--set")
    preset = data.pop("preset", None)
    if preset is not None:
        presets = getattr(cls, "PRESETS", ())
        if preset not in presets:
            raise ConfigError(f"{source}: preset {preset!r} is not one of {list(presets)} for {cls.__name__}")
        data = _merge(to_dict(getattr(cls, preset)()), data)
    return _from_dict(cls, data, source)


def load_config(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load a YAML config file (a local path or any fsspec URL) into ``cls``; errors name
    ``path`` and the key."""
    import fsspec

    path = str(path)
    try:
        with fsspec.open(path, "r", encoding="utf8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return from_dict(cls, data, path, overrides)


_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*):[^/@\s]+@")
_QUERY_SECRET = re.compile(
    r"(?i)([?&](?:token|sig|signature|password|passwd|secret|access_key|api_key)=)[^&\s]+"
)


def redact(value):
    """``value`` with credentials in URLs masked: the password of ``scheme://user:pw@host``
    (an MLflow ``postgresql://`` store, say) and secret query parameters (``?sig=``, ``?token=``).
    Configs hold no credentials by design (they come from the environment, see docs/operations.md
    §5); this keeps one pasted into a URL out of logs and MLflow params."""
    if isinstance(value, str):
        return _QUERY_SECRET.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", value))
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def dump_config(cfg) -> str:
    """The config as YAML for logs (credentials in URLs redacted)."""
    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False, allow_unicode=True)


def mlflow_params(cfg) -> dict[str, str]:
    """The config as MLflow params: flattened keys, values as (redacted) strings within
    MLflow's 6000-character limit."""
    return {k: str(v)[:6000] for k, v in flatten(redact(to_dict(cfg))).items()}


def check(cond: bool, message: str) -> None:
    """Raise ``ValueError`` for a contradictory config (use in ``__post_init__``)."""
    if not cond:
        raise ValueError(message)


def pin_local_path(path: str | None, must_exist: bool = False) -> str | None:
    """``path`` made absolute when it is a local relative path; URLs (``s3://...``) and ``None``
    pass through. Ray workers run in their own working directory, so jobs pin paths on the
    driver. ``must_exist``: also leave alone names that are not existing local paths (hub ids)."""
    import os

    if path is None or "://" in path or os.path.isabs(path) or (must_exist and not os.path.exists(path)):
        return path
    return os.path.abspath(path)
