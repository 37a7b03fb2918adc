"""Configs are dataclasses; YAML files and `key=value` overrides fill them, with strict key checking."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    pass


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown_key(cls: type, key: str) -> ConfigError:
    from alignkit import trl_compat

    valid = sorted(_fields(cls))
    # TRL's names compete with ours for the hint, so a near-miss of a TRL key (num_generation) is never pointed at
    # one of ours that means something else (num_iterations)
    trl = {k: r for k, r in trl_compat.rules_for(trl_compat.LOOPS.get(cls.__name__, "")).items() if k not in valid}
    close = difflib.get_close_matches(key, valid + sorted(trl), n=1, cutoff=0.5)
    hint = ""
    if close and close[0] in trl:
        rule = trl[close[0]]
        meaning = f"read as {rule.key}" if isinstance(rule, trl_compat.Rename) else "not supported"
        hint = f" Did you mean TRL's {close[0]!r} ({meaning})?"
    elif close:
        hint = f" Did you mean {close[0]!r}?"
    return ConfigError(f"unknown {cls.__name__} key {key!r}.{hint} Valid keys: {', '.join(valid)}")


def _coerce(cls: type, key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a command-line string) to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(cls, key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{cls.__name__}.{key}: cannot use {value!r} as {tp}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{cls.__name__}.{key}: {value!r} is not one of {list(args)}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{cls.__name__}.{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{cls.__name__}.{key}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int and isinstance(value, str):
                return int(float(value)) if float(value).is_integer() else int(value)
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{cls.__name__}.{key}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{cls.__name__}.{key}: expected a string, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls.__name__}.{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return origin(_coerce(cls, key, v, inner) for v in value)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{cls.__name__}.{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def build_config(cls: type[C], values: dict[str, Any]) -> C:
    """`cls(**values)` with unknown keys rejected (closest match suggested) and values type-checked."""
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for k, v in values.items():
        if k not in fields:
            raise _unknown_key(cls, k)
        kwargs[k] = _coerce(cls, k, v, hints[k])
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["lr=1e-4", "packing=true"]` -> {"lr": "1e-4", "packing": "true"} (typed later by the dataclass)."""
    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"override {it!r} is not of the form key=value")
        k, v = it.split("=", 1)
        out[k.strip()] = v
    return out


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None, *, quiet: bool = False
) -> C:
    """Read a YAML file (optional), apply `key=value` overrides, build and validate the dataclass (TRL keys
    translated, with a notice each unless ``quiet``)."""
    values: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        values.update(data)
    values.update(parse_overrides(overrides or []))
    from alignkit.trl_compat import translate

    notice = (lambda line: None) if quiet else None
    return build_config(cls, translate(cls, values, notice=notice))  # TRL keys -> ours (a notice each), or refused


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------------------------
# what each key means: written once, as the comment on (or just above) its line in the dataclass
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    name: str
    block: str  # the class that declares the key first (a config block, or the loop's own config)
    type: str
    default: Any
    meaning: str


def _comments(cls: type) -> dict[str, str]:
    """``key -> comment`` of the fields ``cls`` itself declares: the ``# ...`` after ``key: type = default``, or
    the comment lines directly above it."""
    import inspect
    import re

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("#").strip())
            continue
        m = re.match(r"(\w+)\s*:[^=]*(?:=.*)?$", s)
        if m and m.group(1) in cls.__dict__.get("__annotations__", {}):
            inline = re.search(r"#\s*(?!noqa|fmt|type:)(.+)$", s)
            text = inline.group(1).strip() if inline else " ".join(above).strip()
            if text:
                out[m.group(1)] = text
        above = []
    return out


def key_docs(cls: type) -> list[KeyDoc]:
    """Every key of the config dataclass ``cls``, in field order, with the block declaring it first, its type,
    default and meaning (the first class in the MRO, from the base up, that comments it)."""
    hints = typing.get_type_hints(cls)
    meaning: dict[str, str] = {}
    block: dict[str, str] = {}
    for k in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(k):
            continue
        for name in k.__dict__.get("__annotations__", {}):
            block.setdefault(name, k.__name__)
        for name, text in _comments(k).items():
            meaning.setdefault(name, text)
    docs = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tp = hints[f.name]
        name = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else None
        docs.append(KeyDoc(f.name, block[f.name], name or str(tp).replace("typing.", ""), default,
                           meaning.get(f.name, "")))  # fmt: skip
    return docs


def describe_keys(cls: type) -> str:
    """The keys of ``cls`` grouped by block, one line each: ``key (type, default): meaning``."""
    groups: dict[str, list[KeyDoc]] = {k.__name__: [] for k in cls.__mro__}  # the loop's own keys first
    for d in key_docs(cls):
        groups[d.block].append(d)
    groups = {k: v for k, v in groups.items() if v}
    out = [f"config keys of {cls.__name__} (key=value on the command line, or in the --config YAML):"]
    for blk, docs in groups.items():
        out.append(f"\n  {blk}:")
        for d in docs:
            out.append(f"    {d.name} ({d.type}, default {d.default!r}): {d.meaning}")
    return "\n".join(out)


def import_object(path: str, what: str = "object") -> Any:  # noqa: ANN401
    """``pkg.mod:attr.sub`` or ``pkg.mod.attr`` -> the object (``what`` names it in errors: "reward", "tool")."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{what} {path!r} is not a dotted path like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"{what} {path!r}: cannot import module {module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{what} {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
