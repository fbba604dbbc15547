"""A spec's fields as command-line flags: names (nested models flattened, clashes prefixed), types, help and defaults, and text read back into values."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo


NONE = ("none", "null")  # what a field that may be empty takes on the command line


LONGEST_SHOWN_DEFAULT = 60  # longer defaults (a system prompt) are left to the description


Parser = tuple[str, Callable[[str], Any]]  # (metavar, text -> value) for a field's short form


@dataclass
class Flag:
    """One option: the spec field it sets (its path from the spec down) and how its text becomes a value."""

    path: tuple[str, ...]
    info: FieldInfo
    kind: Literal["value", "many", "bool", "switch"]  # switch: an optional sub-model on or off
    item: Any  # the field's type without None; for "many", the type of one item
    nullable: bool
    required: bool  # no default, here or above it
    keep: set[int]  # positions in `path` that are part of the name
    each: tuple[str, ...] | None = None  # the `each` list it belongs to
    each_key: bool = False  # the key of that list: one item per value
    parse: Parser | None = None
    names: tuple[str, ...] = ()
    name: str = ""

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def option(self) -> str:
        return f"--{self.name}"


def spec_flags(spec: type[BaseModel], *, names: dict[str, tuple[str, ...]] | None = None,
               parsers: dict[str, Parser] | None = None, each: dict[str, str] | None = None,
               reserved: tuple[str, ...] = ()) -> list[Flag]:
    """The options of `spec`, named by the rules of this module; `reserved` names are the command's other options."""
    names, parsers, each = names or {}, parsers or {}, each or {}
    flags = list(_walk(spec, (), set(), True, each))
    _name(flags, reserved)
    keys = {flag.key for flag in flags}
    unknown = (set(names) | set(parsers) | {f"{k}.{v}" for k, v in each.items()}) - keys
    if unknown:
        raise TypeError(f"{spec.__name__} has no field {sorted(unknown)} (fields: {sorted(keys)})")
    for flag in flags:
        flag.names = tuple(names.get(flag.key, ()))
        flag.parse = parsers.get(flag.key)
    taken = [*(f"--{r}" for r in reserved), *(n for flag in flags for n in (flag.option, *flag.names))]
    twice = sorted({n for n in taken if taken.count(n) > 1})
    if twice:
        raise TypeError(f"options of {spec.__name__} named twice: {twice}")
    return flags


def _walk(model: type[BaseModel], path: tuple[str, ...], keep: set[int], required: bool, each: dict[str, str]):
    """The flags of `model`'s fields below `path`; `keep`: the positions of the optional models above, named in each."""
    for name, info in model.model_fields.items():
        here = (*path, name)
        kind, nullable = _without_none(info.annotation)
        needed = required and info.is_required()
        if _is_model(kind):
            inner = keep | {len(path)} if nullable else keep
            if nullable:
                yield Flag(here, info, "switch", kind, True, False, set(inner))
            yield from _walk(kind, here, inner, needed and not nullable, each)
        elif ".".join(here) in each:
            key = each[".".join(here)]
            for sub, sub_info in typing.get_args(kind)[0].model_fields.items():
                flag = _leaf((*here, sub), sub_info, keep, needed and sub_info.is_required(), here)
                if sub == key:
                    flag.kind, flag.each_key = "many", True
                yield flag
        else:
            yield _leaf(here, info, keep, needed)


def _leaf(path: tuple[str, ...], info: FieldInfo, keep: set[int], required: bool,
          within: tuple[str, ...] | None = None) -> Flag:
    kind, nullable = _without_none(info.annotation)
    if kind is bool:
        shape = "bool"
    elif typing.get_origin(kind) is list:
        shape, kind = "many", typing.get_args(kind)[0]
    else:
        shape = "value"
    return Flag(path, info, shape, kind, nullable, required, keep | {len(path) - 1}, within)


def _name(flags: list[Flag], reserved: tuple[str, ...]) -> None:
    """Each flag's name: its kept path parts; where names clash, a nested one takes the next field up, until none clash."""
    while True:
        for flag in flags:
            parts = [flag.path[i] for i in sorted(flag.keep)]
            flag.name = "-".join(p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1]).replace("_", "-")
        by_name: dict[str, list[Flag]] = {}
        for flag in flags:
            by_name.setdefault(flag.name, []).append(flag)
        clashes = [group for name, group in by_name.items() if len(group) > 1 or name in reserved]
        if not clashes:
            return
        grew = False
        for group in clashes:
            for flag in group:
                hidden = [i for i in range(len(flag.path)) if i not in flag.keep]
                if hidden:
                    flag.keep.add(max(hidden))
                    grew = True
        if not grew:
            raise TypeError(f"options clash and cannot be told apart: {[g[0].name for g in clashes]}")


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        rest = args[0] if len(args) == 1 else typing.Union[tuple(args)]
        return rest, len(args) < len(typing.get_args(annotation))
    return annotation, False


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _plain(kind: Any) -> bool:
    """Types whose text pydantic reads itself (no JSON): str, numbers, Literal choices."""
    return kind in (str, int, float) or typing.get_origin(kind) is Literal


def flag_metavar(flag: Flag) -> str:
    text = flag.parse[0] if flag.parse else _type_name(flag.item)
    return f"{text}|none" if flag.nullable and flag.kind == "value" else text


def _type_name(kind: Any) -> str:
    """How the help names a type: TEXT, INTEGER, FLOAT, the choices of a Literal, a union's parts; JSON otherwise."""
    if typing.get_origin(kind) is Literal:
        return "[" + "|".join(str(v) for v in typing.get_args(kind)) + "]"
    if typing.get_origin(kind) is typing.Annotated:
        return _type_name(typing.get_args(kind)[0])
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in typing.get_args(kind)]
        return "JSON" if "JSON" in parts else "|".join(p.strip("[]") for p in parts)
    return {str: "TEXT", int: "INTEGER", float: "FLOAT"}.get(kind, "JSON")


def shown_default(flag: Flag, fallbacks: dict[str, Callable[[], Any]]) -> Any:
    """The default the help shows (the spec applies the real one): the field's default in the option's terms."""
    info = flag.info
    if flag.key in fallbacks:
        value = fallbacks[flag.key]()
    elif not info.is_required():
        value = info.get_default(call_default_factory=True, validated_data={})
    else:
        return False if flag.kind == "bool" else None
    if flag.kind in ("bool", "switch"):
        return value is not None and bool(value)
    if value is None:
        return None
    if flag.kind == "many":
        return [_text(v) for v in value] or None
    text = _text(value)
    return text if len(text) <= LONGEST_SHOWN_DEFAULT else None


def _text(value: Any) -> str:
    if isinstance(value, BaseModel):
        return json.dumps(value.model_dump(mode="json"))
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def flag_help(flag: Flag, flags: list[Flag], fallbacks: dict[str, Callable[[], Any]]) -> str:
    text = flag.info.description or flag.info.title or flag.name
    if flag.each_key:
        shared = [f.option for f in flags if f.each == flag.each and f is not flag]
        text += f" Repeat it for several; {', '.join(shared)} apply to each."
    elif flag.kind == "many":
        text += " Repeat the option for several."
    if flag.required and flag.key not in fallbacks:
        text += " Required (here or in --spec)."
    return text


def flag_value(flag: Flag, text: str) -> Any:
    """One command-line text as the spec reads it: None, a parsed short form, JSON, or the text (pydantic converts it)."""
    if flag.nullable and flag.kind == "value" and text.strip().lower() in NONE:
        return None
    if flag.parse:
        return flag.parse[1](text)
    if _plain(flag.item):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text  # e.g. a union's word ('heuristic'): the spec says whether it is one


def projection_flag(text: str):
    """KIND:SCOPE:DIM[:SEED] or kronecker:KOUTxKIN[:SEED] as a projection (the short form of a ProjectionSpec)."""
    from gradlake.tasks.projection.spec import parse_projection

    return parse_projection(text)


def model_at_flag(text: str) -> dict:
    """MODEL[@CHECKPOINT] as a ModelSpec document."""
    model, _, checkpoint = text.rpartition("@") if "@" in text else (text, "", "")
    return {"model": model, "checkpoint": checkpoint or None}


def factors_flag(text: str) -> list[int]:
    """KOUTxKIN, e.g. 64x32, as a Kronecker projection's two factors."""
    pair = [int(v) for v in text.split("x") if v.isdigit()]
    if len(pair) != 2 or text.count("x") != 1:
        raise ValueError(f"factors {text!r} must be KOUTxKIN, e.g. 64x32")
    return pair


def bytes_flag(text: str) -> int | str:
    """A size as bytes, or with a unit: 512MiB, 2GiB (the spec says what a bad one is)."""
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, size in units.items():
        if text.endswith(unit) and text[:-len(unit)].strip().isdigit():
            return int(text[:-len(unit)]) * size
    return text
