"""One toolkit for every config dataclass: dicts -> validated frozen dataclasses, overrides, CLI flags.

A config class declares its fields once (type, default, documentation, ranges); this module turns
TOML/JSON tables into instances (`from_dict`), validates them in `__post_init__` (`check_fields`),
merges `key.path=value` overrides (`apply_overrides`) and generates argparse options whose help is
the field's documentation (`add_config_arguments`). Standard library only (no torch).

    @dataclass(frozen=True)
    class InversionConfig:
        steps: int = option(3000, min=1)
        '''Optimisation steps.'''

        def __post_init__(self) -> None:
            check_fields(self, "inversion config")
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import PurePath
from typing import Any, Callable, Collection, Iterable, Literal, Mapping, Sequence, TypeVar, Union

from recare.errors import RecareError
from recare.io import json_ready

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "GIVEN_ATTRIBUTE",
    "HelpFormatter",
    "add_config_arguments",
    "apply_overrides",
    "check_fields",
    "coerce",
    "deep_merge",
    "field_docs",
    "from_dict",
    "given_overrides",
    "option",
    "parse_override",
    "parse_value",
    "to_dict",
    "type_name",
]

T = TypeVar("T")
GIVEN_ATTRIBUTE = "_given"
"""Namespace attribute holding the set of argparse dests the user gave explicitly."""

_MISMATCH = object()  # _convert's answer when `value` does not have the hinted type
_UNION_TYPES = (Union, types.UnionType)

# ----------------------------------------------------------------------------- field metadata


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           doc: str | None = None, choices: Iterable[Any] | None = None, min: float | None = None,
           max: float | None = None, min_exclusive: bool = False, max_exclusive: bool = False,
           flag: str | None = None, aliases: Sequence[str] = (), cli: bool = True) -> Any:
    """A dataclasses.field whose metadata holds checks (choices, min, max) and CLI settings (flag, aliases, cli)."""
    metadata: dict[str, Any] = {}
    for key, value in (("doc", doc), ("min", min), ("max", max), ("flag", flag)):
        if value is not None:
            metadata[key] = value
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if min_exclusive:
        metadata["min_exclusive"] = True
    if max_exclusive:
        metadata["max_exclusive"] = True
    if aliases:
        metadata["aliases"] = tuple(aliases)
    if not cli:
        metadata["cli"] = False
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


# ----------------------------------------------------------------------------- dicts -> dataclasses


def from_dict(cls: type[T], data: Any, where: str, *, required: Collection[str] = ()) -> T:
    """Build dataclass `cls` from a Mapping: no unknown keys, required keys present, values coerced.

    Nested dataclass fields (also `X | None`, `list[X]`) are built recursively with where "where.name".
    """
    if not isinstance(data, Mapping):
        raise RecareError(f"{where} must be a table/JSON object, got {type(data).__name__}")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    known = [f.name for f in fields]
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise RecareError(f"{where} has unknown key(s) {unknown}; known keys: {sorted(known)}")
    must = [f.name for f in fields if f.name in required or _has_no_default(f)]
    missing = [name for name in must if name not in data]
    if missing:
        raise RecareError(f"{where} is missing key(s) {missing}")
    hints = _type_hints(cls)
    return cls(**{name: coerce(value, hints[name], where, name) for name, value in data.items()})


def check_fields(obj: Any, where: str) -> None:
    """For a frozen dataclass's __post_init__: coerce every field in place, then check choices and ranges."""
    hints = _type_hints(type(obj))
    fields = dataclasses.fields(obj)
    for f in fields:
        value = getattr(obj, f.name)
        coerced = coerce(value, hints[f.name], where, f.name)
        if coerced is not value:
            object.__setattr__(obj, f.name, coerced)
    for f in fields:
        _check_limits(getattr(obj, f.name), f, where)


def coerce(value: Any, hint: Any, where: str, name: str) -> Any:
    """`value` as type `hint` (int -> float, list <-> tuple, Mapping -> dataclass); the same object if unchanged.

    Raises RecareError "{where}: '{name}' must be {type}, got {value!r}".
    """
    converted = _convert(value, hint, where, name, f"{where}.{name}")
    if converted is _MISMATCH:
        raise RecareError(f"{where}: '{name}' must be {type_name(hint)}, got {value!r}")
    return converted


def type_name(hint: Any) -> str:
    """Readable name of a type hint: "int", "int | None", "list[str]", "tuple[int, ...]", "one of ['a', 'b']"."""
    if hint is Any:
        return "Any"
    if hint is None or hint is type(None):
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNION_TYPES:
        return " | ".join(type_name(arg) for arg in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is not None:
        base = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        if not args:
            return base
        return f"{base}[{', '.join('...' if arg is Ellipsis else type_name(arg) for arg in args)}]"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _convert(value: Any, hint: Any, where: str, name: str, path: str) -> Any:
    """`value` as `hint`, or _MISMATCH; RecareError for problems inside (nested dataclass, tuple length)."""
    if hint is Any:
        return value
    if hint is None or hint is type(None):
        return value if value is None else _MISMATCH
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNION_TYPES:
        return _convert_union(value, args, where, name, path)
    if origin is Literal:
        return value if any(value == arg and type(value) is type(arg) for arg in args) else _MISMATCH
    if origin in (tuple, list):
        return _convert_sequence(value, origin, args, where, name, path)
    if origin is dict:
        return _convert_dict(value, args, where, name, path)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, path) if isinstance(value, Mapping) else _MISMATCH
    return _convert_scalar(value, origin or hint)


def _convert_union(value: Any, args: tuple[Any, ...], where: str, name: str, path: str) -> Any:
    """The first member of the union that accepts `value`; an inner error if one member raised."""
    errors: list[RecareError] = []
    for arg in args:
        try:
            converted = _convert(value, arg, where, name, path)
        except RecareError as err:
            errors.append(err)
            continue
        if converted is not _MISMATCH:
            return converted
    if errors:
        raise errors[0]
    return _MISMATCH


def _convert_sequence(value: Any, origin: type, args: tuple[Any, ...], where: str, name: str, path: str) -> Any:
    """list[X], tuple[X, ...] and fixed tuple[X, Y]; a list or a tuple is accepted for each."""
    if not isinstance(value, (list, tuple)):
        return _MISMATCH
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise RecareError(f"{where}: '{name}' must be a list of {len(args)} values, got {value!r}")
        items = args
    else:
        items = (args[0] if args else Any,) * len(value)
    converted = [_convert(v, hint, where, name, f"{path}[{i}]") for i, (v, hint) in enumerate(zip(value, items))]
    if any(c is _MISMATCH for c in converted):
        return _MISMATCH
    unchanged = type(value) is origin and all(c is v for c, v in zip(converted, value))
    return value if unchanged else origin(converted)


def _convert_dict(value: Any, args: tuple[Any, ...], where: str, name: str, path: str) -> Any:
    """dict[K, V]: every key and value converted; any Mapping is accepted."""
    if not isinstance(value, Mapping):
        return _MISMATCH
    key_hint, value_hint = args if len(args) == 2 else (Any, Any)
    converted = {}
    for key, item in value.items():
        new_key = _convert(key, key_hint, where, name, path)
        new_item = _convert(item, value_hint, where, name, f"{path}.{key}")
        if new_key is _MISMATCH or new_item is _MISMATCH:
            return _MISMATCH
        converted[new_key] = new_item
    unchanged = type(value) is dict and all(converted[k] is v for k, v in value.items())
    return value if unchanged else converted


def _convert_scalar(value: Any, hint: Any) -> Any:
    """int, float (an int becomes a float), str, bool, Path (from str) and other classes by isinstance."""
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _MISMATCH
        return value if isinstance(value, float) else float(value)
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if isinstance(hint, type) and issubclass(hint, PurePath) and isinstance(value, str):
        return hint(value)
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _MISMATCH
    return value  # a typing construct this toolkit does not check (TypeVar, Callable, ...)


def _check_limits(value: Any, f: dataclasses.Field, where: str) -> None:
    """metadata choices / min / max of field `f`; None skips; lists and tuples are checked item by item."""
    if value is None or not any(key in f.metadata for key in ("choices", "min", "max")):
        return
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if item is not None:
            _check_item(item, f.name, f.metadata, where)


def _check_item(item: Any, name: str, meta: Mapping[str, Any], where: str) -> None:
    choices = meta.get("choices")
    if choices is not None and item not in choices:
        raise RecareError(f"{where}: unknown {name} {item!r}; choose one of {list(choices)}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None:
        exclusive = meta.get("min_exclusive", False)
        if not (item > low if exclusive else item >= low):
            raise RecareError(f"{where}: {name} must be {'>' if exclusive else '>='} {low}, got {item}")
    if high is not None:
        exclusive = meta.get("max_exclusive", False)
        if not (item < high if exclusive else item <= high):
            raise RecareError(f"{where}: {name} must be {'<' if exclusive else '<='} {high}, got {item}")


def _has_no_default(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(hint: Any) -> Any:
    """X for `X | None`; other hints unchanged."""
    if typing.get_origin(hint) not in _UNION_TYPES:
        return hint
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if len(args) == 1 else hint


# ----------------------------------------------------------------------------- merging and overrides


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `update` on top; nested Mappings are merged, not replaced. Neither input is mutated."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping):
            below = merged.get(key)
            merged[key] = deep_merge(below if isinstance(below, Mapping) else {}, value)
        else:
            merged[key] = value
    return merged


def parse_value(text: str) -> Any:
    """A TOML value ("2" -> 2, "0.5" -> 0.5, "[1, 4]" -> [1, 4], "true" -> True), else the stripped text."""
    text = text.strip()
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if list(parsed) == ["v"] else text


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """ "a.b=3" -> (("a", "b"), 3); the value is parsed by parse_value."""
    key, sep, value = text.partition("=")
    parts = tuple(part.strip() for part in key.split("."))
    if not sep or not all(parts):
        raise RecareError(f"override {text!r} must look like key=value or table.key=value (e.g. rounds=2)")
    return parts, parse_value(value)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` with each "a.b=value" override deep-merged in order; a nested path creates tables."""
    merged = dict(data)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = merged
        for depth, part in enumerate(parts[:-1]):
            node = node.get(part) if isinstance(node, Mapping) else None
            if node is not None and not isinstance(node, Mapping):
                raise RecareError(f"override {text!r}: '{'.'.join(parts[:depth + 1])}' is not a table")
        update: Any = value
        for part in reversed(parts):
            update = {part: update}
        merged = deep_merge(merged, update)
    return merged


# ----------------------------------------------------------------------------- documentation


def field_docs(cls: type) -> dict[str, str]:
    """{field name: one-line documentation}: attribute docstring, else trailing # comment, else metadata doc."""
    return dict(_cached_field_docs(cls))


@functools.lru_cache(maxsize=None)
def _cached_field_docs(cls: type) -> dict[str, str]:
    source_docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            source_docs.update(_source_docs(klass))
    docs = {}
    for f in dataclasses.fields(cls):
        text = source_docs.get(f.name) or f.metadata.get("doc") or f.metadata.get("help")
        if text:
            docs[f.name] = " ".join(str(text).split())
    return docs


def _source_docs(cls: type) -> dict[str, str]:
    """Field docs written in the class body of `cls`; {} when its source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return {}
    comments = _line_comments(source)
    docs = {}
    for statement, following in zip(node.body, [*node.body[1:], None]):
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            lines = range(statement.lineno, (statement.end_lineno or statement.lineno) + 1)
            comment = next((comments[line] for line in lines if line in comments), None)
            text = _attribute_docstring(following) or comment
            if text:
                docs[statement.target.id] = text
    return docs


def _attribute_docstring(statement: ast.stmt | None) -> str | None:
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        if isinstance(statement.value.value, str):
            return inspect.cleandoc(statement.value.value)
    return None


def _line_comments(source: str) -> dict[int, str]:
    """{line number: comment text} of every # comment (tool pragmas such as noqa excluded)."""
    comments = {}
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            text = token.string.lstrip("#").strip()
            if token.type == tokenize.COMMENT and text and not text.startswith(("noqa", "type:", "pragma")):
                comments[token.start[0]] = text
    except (tokenize.TokenError, SyntaxError):
        return {}
    return comments


# ----------------------------------------------------------------------------- command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" once; nothing for None defaults or helps that already name their default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "%(default)" in text or "default:" in text:
            return action.help
        return super()._get_help_string(action)


class _GivenStore(argparse.Action):
    """store, recording the dest in namespace._given; lists become `sequence_type` (tuple) when set."""

    def __init__(self, option_strings: Sequence[str], dest: str, sequence_type: type | None = None,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.sequence_type = sequence_type

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if self.sequence_type is not None and isinstance(values, list):
            values = self.sequence_type(values)
        setattr(namespace, self.dest, values)
        _mark_given(namespace, self.dest)


class _GivenBoolean(argparse.BooleanOptionalAction):
    """--flag / --no-flag, recording the dest in namespace._given."""

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = None, help: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, default=default, help=help, **kwargs)
        self.help = help  # without the "(default: ...)" of Python < 3.14; HelpFormatter adds it

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _mark_given(namespace, self.dest)


def _mark_given(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, GIVEN_ATTRIBUTE, set(getattr(namespace, GIVEN_ATTRIBUTE, ())) | {dest})


@dataclasses.dataclass(frozen=True)
class _Selection:
    """Which dotted field paths become options and under which flag names."""

    exclude: frozenset[str]
    only: frozenset[str] | None
    flags: Mapping[str, str]

    def includes(self, path: str) -> bool:
        if self.only is None:
            return True
        return any(path == p or path.startswith(p + ".") for p in self.only)


def add_config_arguments(parser: Any, cls: type, *, prefix: str = "", exclude: Collection[str] = (),
                         only: Collection[str] | None = None, flags: Mapping[str, str] | None = None,
                         defaults: Any = None) -> dict[str, str]:
    """Add one option per field of `cls` (nested dataclasses as --outer-inner) to a parser or group.

    Returns {argparse dest: dotted field path}; pass it to `given_overrides` after parsing.
    `exclude` / `only` / `flags` take dotted paths ("inversion.steps"; "inversion" selects its fields).
    `defaults`: an instance of `cls` whose values the help shows (default: the declared defaults).
    """
    selection = _Selection(frozenset(exclude), None if only is None else frozenset(only), dict(flags or {}))
    dests: dict[str, str] = {}
    _add_fields(parser, cls, defaults, "", prefix, selection, dests)
    return dests


def _add_fields(parser: Any, cls: type, defaults: Any, path_prefix: str, flag_prefix: str,
                selection: _Selection, dests: dict[str, str]) -> None:
    hints, docs = _type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        path = path_prefix + f.name
        if not f.init or not f.metadata.get("cli", True) or path in selection.exclude:
            continue
        hint = _strip_optional(hints[f.name])
        default = _field_default(f, defaults)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            nested_defaults = default if isinstance(default, hint) else None
            nested_prefix = f"{flag_prefix}{f.name}-"
            _add_fields(parser, hint, nested_defaults, path + ".", nested_prefix, selection, dests)
        elif selection.includes(path):
            names = _flag_names(f, path, flag_prefix, selection.flags)
            dest = names[0].lstrip("-").replace("-", "_")
            help_text = docs[f.name].replace("%", "%%") if f.name in docs else None
            parser.add_argument(*names, dest=dest, default=default, help=help_text,
                                **_argparse_kwargs(hint, f.metadata))
            dests[dest] = path


def _field_default(f: dataclasses.Field, defaults: Any) -> Any:
    """The field's value in the `defaults` instance, else its declared default; None when it has none."""
    if defaults is not None:
        return getattr(defaults, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _flag_names(f: dataclasses.Field, path: str, flag_prefix: str, flags: Mapping[str, str]) -> list[str]:
    """metadata flag, else flags[path], else --prefix-name; then the metadata aliases."""
    primary = f.metadata.get("flag") or flags.get(path) or (flag_prefix + f.name).replace("_", "-")
    return [_as_flag(name) for name in (primary, *f.metadata.get("aliases", ()))]


def _as_flag(name: str) -> str:
    return name if name.startswith("-") else "--" + name


def _argparse_kwargs(hint: Any, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """action / type / nargs / metavar / choices for a field of type `hint` (Optional already stripped)."""
    if hint is bool:
        return {"action": _GivenBoolean}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    element = hint
    kwargs: dict[str, Any] = {"action": _GivenStore}
    if origin in (tuple, list) and args and all(_scalar_parser(arg) for arg in args if arg is not Ellipsis):
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            element = args[0]
            kwargs.update(nargs="+", type=_scalar_parser(element), sequence_type=origin, metavar=_metavar(element))
        else:
            parsers = {_scalar_parser(arg) for arg in args}
            element = args[0] if len(set(args)) == 1 else Any
            kwargs.update(nargs=len(args), type=parsers.pop() if len(parsers) == 1 else parse_value,
                          sequence_type=tuple, metavar=tuple(_metavar(arg) for arg in args))
    else:
        parser = _scalar_parser(hint)
        kwargs.update(type=parser or parse_value, metavar=_metavar(hint) if parser else "TOML")
    choices = metadata.get("choices")
    if choices is None and typing.get_origin(element) is Literal:
        choices = typing.get_args(element)
    if choices is not None:
        kwargs["choices"] = list(choices)
        kwargs.pop("metavar", None)  # argparse shows {a,b}
    return kwargs


def _scalar_parser(hint: Any) -> Callable[[str], Any] | None:
    """The argparse `type` of one scalar value: int, float, str, a Path class, or a Literal's value type."""
    if hint in (int, float, str):
        return hint
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return hint
    if typing.get_origin(hint) is Literal:
        kinds = {type(arg) for arg in typing.get_args(hint)}
        if len(kinds) == 1 and kinds <= {int, float, str}:
            return kinds.pop()
    return None


def _metavar(hint: Any) -> str:
    """INT, FLOAT, STR or PATH for one value of type `hint`; VALUE otherwise."""
    if hint in (int, float, str):
        return hint.__name__.upper()
    return "PATH" if isinstance(hint, type) and issubclass(hint, PurePath) else "VALUE"


def given_overrides(args: argparse.Namespace, dests: Mapping[str, str]) -> dict[str, Any]:
    """Nested {path part: value} of the options in `dests` the user gave (a default value given counts)."""
    given = getattr(args, GIVEN_ATTRIBUTE, ())
    overrides: dict[str, Any] = {}
    for dest, path in dests.items():
        if dest not in given:
            continue
        *tables, name = path.split(".")
        node = overrides
        for table in tables:
            node = node.setdefault(table, {})
        node[name] = getattr(args, dest)
    return overrides


# ----------------------------------------------------------------------------- JSON


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance as a JSON-ready dict (see json_ready)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(obj).__name__}")
    return json_ready(obj)
