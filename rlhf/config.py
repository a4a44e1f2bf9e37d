"""Typed, validated configs: YAML + ``key=value`` overrides bound onto dataclasses.

Every key is checked against the dataclass fields and their types at load time, and the error
names the key path (``optim.lr``), before anything starts. A dataclass may define
``validate()`` for checks across keys; it runs after binding.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rewards.errors import ConfigError

T = TypeVar("T")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        return bind(tp, value, path)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {_type_name(tp)}")


def bind(cls: type[T], data: dict | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types recursively."""
    data = {} if data is None else data
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    _refuse_renamed(cls, data, path)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    obj = cls(**kwargs)
    return obj


def _refuse_renamed(cls, data: dict, path: str) -> None:
    """A key the schema renamed (``cls.RENAMED``: old dotted key -> new place) is an error
    naming the new place, not an unknown key, and never silently ignored."""
    renamed = getattr(cls, "RENAMED", {})
    for old in sorted(renamed, key=lambda k: -k.count(".")):  # the most specific first
        new = renamed[old]
        node = data
        for part in old.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            key = f"{path}.{old}" if path else old
            raise ConfigError(f"{key}: renamed, use {new}")


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["optim.lr=1e-3", "rewards=[{name: hp}]"]`` -> a nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is set to a value and a mapping")
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge ``extra`` into a copy of ``base`` (mappings merge, anything else replaces)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read YAML (optional), apply overrides, bind and ``validate()``; errors name the key."""
    data = read_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides))
    cfg = bind(cls, data)
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ConfigError:
            raise
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from e
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (for MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
