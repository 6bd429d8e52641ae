"""Command-line options generated from a pydantic model's fields: a setting is declared once (name, type,
default and description on the field) and every command that exposes it derives its option from there.

Types: ``int``, ``float``, ``str`` take one value; ``bool`` gives ``--x`` / ``--no-x``; ``tuple[T, ...]`` takes
comma-separated values; ``T | None`` takes a T (default None). The option is the field's name with '-' for '_'
unless renamed; the parsed value lands under the field's own name, so `model_values` reads it back.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from fedpath.common.cli import UserError

Model = TypeVar("Model", bound=BaseModel)
_METAVARS: dict[type, str] = {int: "N", float: "X", str: "NAME"}


def _scalar(annotation: Any) -> type:
    """The one value type of an annotation: T for T and for T | None."""
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        if len(kinds) == 1:
            return _scalar(kinds[0])
    if annotation in (int, float, str, bool):
        return annotation
    raise TypeError(f"no command-line form for a field of type {annotation}")


def _listed(kind: type) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a comma-separated list of {kind.__name__} values"
            ) from None

    parse.__name__ = f"list of {kind.__name__}"  # argparse names the type in its error messages
    return parse


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_name(field: str, names: Mapping[str, str] | None = None) -> str:
    """The option of a field: ``--`` and the field's name with '-' for '_', unless `names` renames it."""
    return "--" + (names or {}).get(field, field.replace("_", "-"))


def add_model_options(
    group: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    fields: Iterable[str],
    *,
    names: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
    metavars: Mapping[str, str] | None = None,
) -> None:
    """Add one option per field of `model` to `group`: type, default and help taken from the field, unless
    `defaults` (this command's own default), `helps` or `metavars` say otherwise."""
    for field in fields:
        info = model.model_fields[field]
        default = (defaults or {}).get(field, info.default)
        text = (helps or {}).get(field) or info.description or field.replace("_", " ")
        option = option_name(field, names)
        meta = (metavars or {}).get(field)
        if get_origin(info.annotation) is tuple:
            kind = _scalar(get_args(info.annotation)[0])
            meta = meta or f"{_METAVARS[kind]}[,{_METAVARS[kind]}]"
            shown = default if isinstance(default, str) else ",".join(_shown(v) for v in default)
            group.add_argument(option, dest=field, metavar=meta, type=_listed(kind), default=shown, help=text)
        elif (kind := _scalar(info.annotation)) is bool:
            group.add_argument(
                option, dest=field, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        else:
            meta = meta or _METAVARS[kind]
            group.add_argument(option, dest=field, metavar=meta, type=kind, default=default, help=text)


def model_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The parsed values of every field of `model` that has an option (fields without one keep defaults)."""
    return {f: getattr(args, f) for f in model.model_fields if hasattr(args, f)}


def build_model(
    model: type[Model],
    values: Mapping[str, Any],
    *,
    names: Mapping[str, str] | None = None,
    what: str = "settings",
) -> Model:
    """`model` from `values`; a validation error becomes a `UserError` naming each option and the problem."""
    try:
        return model(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"{option_name(str(e['loc'][0]), names) if e['loc'] else model.__name__}: {e['msg']}"
            for e in err.errors()
        )
        raise UserError(f"invalid {what}: {problems}") from err
