"""Typed configs: dataclasses loaded from YAML, with dotted ``key=value`` overrides.

    cfg = load_config(ShardConfig, "configs/shards.yaml", ["image_size=256", "roi.size=128"])
    save_config(cfg, out_dir / "config.yaml")

A file may start from another with ``base: other.yaml`` and list only what differs.

Rules: every key in the YAML file or an override must name a field (an unknown key raises and
names it, with the closest field as a hint); values are checked against the field's type, then
against each dataclass's own ranges (its ``__post_init__``, using ``require``), so that a bad value
fails as the config loads; the resolved config is written next to every output so a run can be
reproduced from it alone.
"""
from __future__ import annotations

import dataclasses
import difflib
import io
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the config's dataclass."""


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Range checks in a config dataclass's ``__post_init__``: ConfigError naming the key, the
    value and the rule, so a bad value fails while the config loads, before any set-up."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``overrides``."""
    data = read_yaml(path) if path is not None else {}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return from_dict(cls, data)


def read_yaml(path: str | Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config file as a mapping; ``base: other.yaml`` (relative to this file, else a ``configs/``
    path of the working directory or the package) is loaded first and this file's keys are merged
    over it, so a variant states only what differs."""
    import fsspec

    from sapretrain.resources import resolve_config

    path = resolve_config(path) if not seen else str(path)
    if path in seen:
        raise ConfigError(f"config files include each other: {' -> '.join(seen + (path,))}")
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        if seen:  # a base: key names a file that is not there
            raise ConfigError(f"{seen[-1]}: base: {path} does not exist") from None
        raise ConfigError(f"config file {path} does not exist (nor is it a config shipped in the package)") from None
    except yaml.YAMLError as e:  # bad syntax, or a tag such as !!python/object that safe_load refuses
        raise ConfigError(f"{path}: not a valid config file: {_one_line(e)}") from None
    except (UnicodeDecodeError, RecursionError, OSError) as e:  # binary garbage, absurd nesting, unreadable
        raise ConfigError(f"{path}: not a readable YAML text file ({type(e).__name__}: {_one_line(e)})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    base_path = base if "://" in base or Path(base).is_absolute() else str(Path(path).parent / base)
    if "://" not in base_path and not Path(base_path).exists():
        shipped = resolve_config(base)  # configs/... : the working directory's, else the package's
        base_path = shipped if Path(shipped).exists() else base_path
    return _deep_merge(read_yaml(base_path, seen + (path,)), loaded)


def _one_line(e: BaseException, limit: int = 300) -> str:
    return " ".join(str(e).split())[:limit]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class OverrideValue(str):
    """A command-line value: its text, and its YAML reading (``no`` reads as False in YAML 1.1,
    so a string field such as ``run.precision=no`` must get the text, a bool field the reading)."""

    def __new__(cls, raw: str):
        value = super().__new__(cls, raw)
        try:
            value.parsed = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"override value {raw!r} is not valid YAML ({_one_line(e, 160)}); quote it") from None
        return value


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` → ``("optim.lr", OverrideValue("1e-4"))``; typed when applied."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. data.batch_size=64)")
    return key.strip(), OverrideValue(raw)


def _wants_text(hint: Any) -> bool:
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint))


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{hint}; valid keys here: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    # Nested dataclasses not mentioned keep their defaults via default_factory.
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    buf = io.StringIO()
    yaml.safe_dump(to_dict(cfg), buf, sort_keys=False, default_flow_style=None)
    return buf.getvalue()


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (local path or fsspec URL)."""
    import fsspec

    with fsspec.open(str(path), "w") as f:
        f.write(dump_config(cfg))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if isinstance(value, OverrideValue):
        value = str(value) if _wants_text(hint) and value.parsed is not None else value.parsed
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, prefix=f"{where}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} does not fit {hint}")
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        item = args[1] if len(args) == 2 else Any  # overrides into a mapping get their YAML reading too
        return {k: _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads `5e-4` as a string; accept what Python reads as a float.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint is str and isinstance(value, bool):
        raise ConfigError(f"{where}: expected text, got {value!r} (YAML reads no/yes/off/on as booleans: quote it)")
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    return value
