"""Models as frozen msgspec Structs, with checks of their own.

msgspec checks a mapping's shape and types (`convert`: an unknown key is an
error, and so is a missing one); then `checked` runs what each model declares
with `field_check` (a field's value: refuse it or normalise it) and
`model_check` (the whole model), inner models first, on what the mapping gives
(a default is valid as written). Every refusal is a ModelError with the key
path it is about. A run loads and checks hosts.yaml's models in milliseconds,
where pydantic spent about 0.1 s building its validators on each start.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union, get_args, get_origin

import msgspec
from msgspec import Struct


class Model(Struct, frozen=True, forbid_unknown_fields=True):
    """The base of every model (each declares `kw_only=True`: defaults may come first)."""

    def replace(self, **changes):
        """A copy with these fields changed (no check runs again)."""
        return msgspec.structs.replace(self, **changes)


def field_check(*fields: str) -> Callable:
    """Mark a classmethod `(cls, value) -> value` as the check of these fields: it
    raises ValueError, or returns the value to keep (normalised)."""
    def mark(method):
        method.__check_fields__ = fields
        return method
    return mark


def model_check(method: Callable) -> Callable:
    """Mark a method `(self)` as a check of the whole model: it raises ValueError."""
    method.__check_fields__ = ()
    return method


class ModelError(ValueError):
    """What `convert` or `checked` refuses, and where: `loc` is the key path (('hosts', 'vps1', 'port'));
    `unknown`: set when the last key is one `model` does not know."""

    def __init__(self, loc: tuple, message: str, unknown: bool = False, model: Optional[type] = None):
        super().__init__(message)
        self.loc, self.unknown, self.model = loc, unknown, model


@functools.cache
def _checks(cls: type) -> tuple[dict[str, list[str]], list[str]]:
    """{field: names of its checks}, names of the model checks, of a model class."""
    fields: dict[str, list[str]] = {}
    whole: list[str] = []
    for name, attr in vars(cls).items():
        marked = getattr(attr, "__check_fields__", None)
        if marked == ():
            whole.append(name)
        for field in marked or ():
            fields.setdefault(field, []).append(name)
    return fields, whole


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A model's fields and their types."""
    return {f.name: f.type for f in msgspec.structs.fields(cls)}


def model_at(cls: Optional[type], loc: tuple) -> Optional[type]:
    """The model class that the key path `loc` leads to from `cls` (None: not a model)."""
    parts = list(loc)
    while parts and cls is not None:
        kind = field_types(cls).get(parts.pop(0))
        while get_origin(kind) in (Union, Annotated):  # Optional[X], Annotated[X, Meta]
            kind = next(a for a in get_args(kind) if a is not type(None))
        if get_origin(kind) is dict:
            kind = get_args(kind)[1]
            if parts:
                parts.pop(0)  # the mapping's key (a host's or a homeserver's name)
        cls = kind if isinstance(kind, type) and issubclass(kind, Struct) else None
    return cls


def _as_path(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, (str, Path)):
        return Path(value)
    raise NotImplementedError


def _key_path(at: str) -> tuple:
    """msgspec's `$.a.b[0]` -> ('a', 'b', 0); stops at a mapping's entry (`[...]`)."""
    loc: list = []
    for name, index in re.findall(r"\.([^.\[]+)|\[([0-9]+|\.\.\.)\]", at):
        if index == "...":
            break
        loc.append(name or int(index))
    return tuple(loc)


def convert(raw: Any, cls: type, loc: tuple) -> Any:
    """msgspec's check of the shape and types of `raw` as a `cls`; ModelError at `loc`."""
    try:
        return msgspec.convert(raw, cls, strict=False, dec_hook=_as_path)
    except msgspec.ValidationError as exc:
        message, _, at = str(exc).partition(" - at `$")
        inner = _key_path(at.rstrip("`"))  # inside `raw`
        where = loc + inner
        unknown = re.match(r"^Object contains unknown field `(.*)`$", message, re.S)
        if unknown:
            raise ModelError(where + (unknown[1],), "unknown key", unknown=True, model=model_at(cls, inner)) from None
        missing = re.match(r"^Object missing required field `(.*)`$", message, re.S)
        if missing:
            raise ModelError(where + (missing[1],), "this key is required") from None
        if message.startswith("Invalid enum value") and inner:
            model = model_at(cls, inner[:-1])
            kind = field_types(model).get(inner[-1]) if model else None
            choices = get_args(kind) if get_origin(kind) is Literal else ()
            if choices:
                message = f"{message.removeprefix('Invalid enum value ')} is not one of: {', '.join(map(str, choices))}"
        for theirs, ours in (("`object`", "a mapping"), ("`array`", "a list")):
            message = message.replace(theirs, ours)
        raise ModelError(where, message.replace("`", "")) from None


def checked(obj: Any, raw: Any, loc: tuple) -> Any:
    """`obj` (converted from `raw`) after its models' checks: inner models first,
    then each field's, then the model's. Only what `raw` gives is checked: a
    default is valid as written."""
    if isinstance(obj, dict) and isinstance(raw, dict):
        out = {k: checked(v, raw.get(k), (*loc, k)) for k, v in obj.items()}
        return obj if all(out[k] is obj[k] for k in obj) else out
    if not isinstance(obj, Model) or not isinstance(raw, dict):
        return obj
    fields, whole = _checks(type(obj))
    changes = {}
    for name in obj.__struct_fields__:
        if name not in raw:
            continue
        value = checked(getattr(obj, name), raw[name], (*loc, name))
        for check in fields.get(name, ()):
            try:
                value = getattr(obj, check)(value)
            except ValueError as exc:
                raise ModelError((*loc, name), str(exc)) from None
        if value is not getattr(obj, name):
            changes[name] = value
    obj = obj.replace(**changes) if changes else obj
    for check in whole:
        try:
            getattr(obj, check)()
        except ValueError as exc:
            raise ModelError(loc, str(exc)) from None
    return obj
