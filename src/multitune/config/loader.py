"""YAML + dotted overrides -> a validated ``RunConfig``, with errors that name the key."""

from __future__ import annotations

import copy
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from multitune.config.schema import RunConfig
from multitune.tasks.registry import resolve_task_preset


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the file and key path."""


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (YAML), apply ``key.path=value`` overrides, resolve task presets, validate."""
    source = str(path) if path else "<overrides>"
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw, source)


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    raw = copy.deepcopy(raw)
    tasks = raw.get("tasks")
    if isinstance(tasks, list):
        try:
            raw["tasks"] = [resolve_task_preset(t) if isinstance(t, dict) else t for t in tasks]
        except KeyError as exc:
            raise ConfigError(f"{source}: {exc.args[0]}") from None
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    for index, task in enumerate(config.tasks):
        missing = [k for k in ("name", "dataset", "kind") if getattr(task, k) is None]
        if missing:
            raise ConfigError(
                f"{source}: tasks.{index} needs {', '.join(missing)} (or a `preset` that sets them)"
            )
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in ``raw``; the value is parsed as YAML (``3`` -> int, ``[a, b]``)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, parts[: depth + 1], create=True)
    last = parts[-1]
    parsed = yaml.safe_load(value) if value.strip() else ""
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = parsed
    else:
        node[last] = parsed


def _child(node: Any, part: str, path: list[str], create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"override path {'.'.join(path)}: parent is not a mapping")
    if part not in node and create:
        node[part] = {}
    return node[part]


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(
            f"override path {'.'.join(path)}: {part!r} is not an index of a list of {len(node)}"
        )
    return int(part)


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            valid = _fields_at(RunConfig, loc[:-1])
            hint = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            parent = ".".join(loc[:-1])
            where = f"{parent}." if parent else ""
            suggestion = f"; did you mean '{where}{hint[0]}'?" if hint else ""
            lines.append(
                f"  unknown key '{key}'{suggestion} (valid keys here: {', '.join(sorted(valid))})"
            )
        elif err["type"] == "missing":
            lines.append(f"  missing required key '{key}'")
        else:
            expected = _expected_type(RunConfig, loc)
            got = err.get("input")
            detail = err["msg"]
            lines.append(
                f"  {key}: {detail}" + (f" (expected {expected}, got {got!r})" if expected else "")
            )
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if part.isdigit():
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    """Unwrap ``list[X]``, ``X | None`` to the BaseModel inside, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    found = _model_at(model, loc)
    return list(found.model_fields) if found else []


def _expected_type(model: type[BaseModel], loc: list[str]) -> str | None:
    names = [p for p in loc if not p.isdigit()]
    parent = _model_at(model, names[:-1]) if names else None
    if parent is None or names[-1] not in parent.model_fields:
        return None
    return _type_name(parent.model_fields[names[-1]].annotation)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is type(None):
        return "null"
    return {"float": "a number", "int": "an integer", "str": "a string", "bool": "true/false"}.get(
        getattr(annotation, "__name__", str(annotation)), getattr(annotation, "__name__", "?")
    )


def flatten_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every leaf key path of the schema (list items as ``tasks.*``), for the pinned-key test."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        inner = _inner_model(field.annotation)
        is_list = typing.get_origin(field.annotation) is list
        path = f"{prefix}{name}" + (".*" if is_list and inner else "")
        if inner is not None:
            keys.extend(flatten_keys(inner, path + "."))
        else:
            keys.append(path)
    return keys


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
