"""`Config`: the one base of every config section (model, data, train, optimizer, mesh, ...).

A section is a frozen, keyword-only dataclass that mixes in `Config` and names its YAML
section in `section`. It validates itself in `__post_init__` with the small validators
below, whose messages name `section.key`, the bad value and what is allowed. `from_dict`
reads a mapping (a YAML section, a saved config.json): unknown keys fail with the valid
ones listed (nearest first), lists become tuples, and whole floats such as YAML's `1e3`
become ints; the field types come from `typing.get_type_hints`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="Config")


class Config:
    """Mixin for frozen, keyword-only dataclasses that are one config section."""

    section: ClassVar[str] = ""  # the YAML section, e.g. "train"; "" for the top level.
    extra_keys: ClassVar[tuple[str, ...]] = ()  # keys `from_dict` takes besides the fields.

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def key(cls, name: str) -> str:
        """`section.name`, the way a YAML file or an override spells the field."""
        return f"{cls.section}.{name}" if cls.section else name

    @classmethod
    def check_keys(cls, d: Mapping[str, Any]) -> None:
        """Raise ValueError for keys that are neither fields nor `extra_keys`."""
        valid = [*cls.field_names(), *cls.extra_keys]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            where = f"in section {cls.section!r}" if cls.section else "at the top level"
            raise ValueError(
                f"unknown {cls.__name__} keys {unknown} {where}; valid keys are "
                f"{nearest_first(unknown, valid)}."
            )

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any] | None) -> C:
        """Build from a mapping: unknown keys fail, values are coerced to the field types."""
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ValueError(f"config section {cls.section!r} must be a mapping; got {d!r}.")
        cls.check_keys(d)
        hints = _hints(cls)
        kwargs = {k: _coerce(v, hints[k], cls.key(k)) for k, v in d.items()}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"{cls.__name__}: {[cls.key(m) for m in missing]} must be given.")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (tuples become lists, sections become mappings) for YAML/JSON."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def derived_defaults(self) -> dict[str, Any]:
        """Optional fields whose None default is derived from other fields, and the value
        None stands for in this config (a section with such fields overrides this)."""
        return {}

    def _fill_derived(self) -> None:
        """Set each derived field left None to its value (for `__post_init__`)."""
        for name, value in self.derived_defaults().items():
            if getattr(self, name) is None and value is not None:
                object.__setattr__(self, name, value)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again). A derived field that holds
        its default is derived again from the changed fields, as if it had been left out."""
        for name, value in self.derived_defaults().items():
            if name not in changes and getattr(self, name) == value:
                changes[name] = None
        return dataclasses.replace(self, **changes)


# Validators ---------------------------------------------------------------------------------


def one_of(cfg: Config, name: str, allowed: Iterable[Any]) -> None:
    """`cfg.name` must be one of `allowed`."""
    value, allowed = getattr(cfg, name), list(allowed)
    if value not in allowed:
        raise ValueError(f"{cfg.key(name)}={value!r} is not one of {allowed}.")


def at_least(cfg: Config, name: str, low: float, *, strict: bool = False, note: str = "") -> None:
    """`cfg.name` must be >= low (> low if `strict`); an int field must hold an integer.
    None passes (an optional field left unset). `note` says what the bound means."""
    value = getattr(cfg, name)
    if value is None:
        return
    integer = _hints(type(cfg)).get(name) in (int, int | None)
    kind = "an integer " if integer else ""
    ok = _is_int(value) if integer else _is_number(value)
    if not ok or (value <= low if strict else value < low):
        op = ">" if strict else ">="
        note = f" ({note})" if note else ""
        raise ValueError(f"{cfg.key(name)}={value!r} must be {kind}{op} {low}{note}.")


def in_interval(
    cfg: Config,
    name: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """`cfg.name` must lie in the interval; `low_open`/`high_open` exclude the ends."""
    value = getattr(cfg, name)
    ok = _is_number(value) and (
        (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{cfg.key(name)}={value!r} must be in {lo}{low:g}, {high:g}{hi}.")


def nearest_first(wrong: Iterable[str], valid: Iterable[str]) -> list[str]:
    """`valid`, the names closest to any of `wrong` first (difflib), then the rest in order."""
    valid = list(valid)
    close: list[str] = []
    for w in wrong:
        close += [m for m in difflib.get_close_matches(w, valid, n=3, cutoff=0.6) if m not in close]
    return close + [v for v in valid if v not in close]


# Coercion -----------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type `hint` asks for, or ValueError naming `where` (section.key)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return _coerce(value, rest[0], where) if len(rest) == 1 else value
    if hint is Any:
        return value
    name = getattr(hint, "__name__", str(hint))
    if value is None:
        raise ValueError(f"{where} must be given a value ({name}); got nothing.")
    if isinstance(hint, type) and issubclass(hint, Config):
        return value if isinstance(value, hint) else hint.from_dict(value)
    if hint is bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise ValueError(f"{where}={value!r} must be true or false.")
    if hint is int:
        if not _is_number(value):
            raise ValueError(f"{where}={value!r} must be a number ({name}).")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{where}={value!r} must be a whole number ({name}).")
        return int(value)  # `1e3` from YAML or an override
    if hint is float:
        if not _is_number(value):
            raise ValueError(f"{where}={value!r} must be a number ({name}).")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}={value!r} must be a string (quote it in YAML).")
        return value
    if origin is tuple:
        item = args[0] if args else Any
        if isinstance(value, str) and item is str:
            return (value,)  # one path for a list of paths
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}={value!r} must be a list.")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if (origin or hint) is dict and not isinstance(value, Mapping):
        raise ValueError(f"config section {where!r} must be a mapping; got {value!r}.")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
