"""Type checks of JSON dicts against dataclasses (CARE-set files)."""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from typing import Any, Sequence, Union

from recare.errors import RecareError

logger = logging.getLogger(__name__)

def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise RecareError(f"'{where}' must be a list, got {type(value).__name__}")
    return value


def _string_list(value: Any, where: str) -> list[str]:
    """A non-empty list of non-empty strings."""
    if not isinstance(value, list):
        raise RecareError(f"'{where}' must be a list of strings, got {type(value).__name__}")
    if not value:
        raise RecareError(f"'{where}' is an empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise RecareError(f"'{where}'[{i}] must be a non-empty string, got {item!r}")
    return value


def _check_same_length(a: list, b: list, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise RecareError(f"'{name_a}' has {len(a)} entries but '{name_b}' has {len(b)}")


def _matches_type(value: Any, hint: Any) -> bool:
    """isinstance for the simple hints used here: int, float, str, bool, None, X | None, list[X]."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches_type(value, h) for h in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(_matches_type(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is Any:
        return True
    return isinstance(value, hint)


def _check_field_types(obj: Any, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _matches_type(value, hints[f.name]):
            raise RecareError(f"{where}: '{f.name}' must be {_type_name(hints[f.name])}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _kwargs_from_dict(cls: type, data: Any, where: str, all_required: bool = True,
                      required: Sequence[str] = (), nested: Sequence[str] = ()) -> dict[str, Any]:
    """Check a dict against dataclass `cls`: no unknown keys, required keys present, simple types right."""
    if not isinstance(data, dict):
        raise RecareError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RecareError(f"{where} has unknown key(s) {unknown}")
    must = names if all_required else [f.name for f in dataclasses.fields(cls) if f.name in required or (
        f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)]
    missing = [name for name in must if name not in data]
    if missing:
        raise RecareError(f"{where} is missing key(s) {missing}")
    for name, value in data.items():
        if name in nested or dataclasses.is_dataclass(_strip_optional(hints[name])):
            continue
        if not _matches_type(value, hints[name]):
            raise RecareError(f"{where}: '{name}' must be {_type_name(hints[name])}, got {value!r}")
    return dict(data)


def _strip_optional(hint: Any) -> Any:
    args = [h for h in typing.get_args(hint) if h is not type(None)]
    return args[0] if typing.get_origin(hint) in (Union, types.UnionType) and len(args) == 1 else hint


