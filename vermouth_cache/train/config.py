"""Declared configuration: the pydantic base of every config train and sweep read, and its
validation errors as the one-line VermouthError a user sees.

    class HeadOptions(Declared):
        lr: float = Field(1e-5, description="AdamW learning rate.")   # --lr on the command line

    HeadOptions.parse({"lr": "-1"}, where="recipe r.yaml: train")      # VermouthError, one line

A declaration is the one place a config's keys, types, defaults, choices (Literal types) and help
texts (field descriptions) are written; the CLI options and the sweep recipe keys are read from it.
Unknown keys are refused by name, with the allowed ones listed.
"""

from __future__ import annotations

import re
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from vermouth_cache.core.errors import VermouthError


def check_keys(given, allowed, where: str = "") -> None:
    """Refuse keys of `given` not in `allowed`, naming them and the allowed ones."""
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise VermouthError(f"{where + ': ' if where else ''}unknown key(s) {', '.join(map(str, unknown))} "
                            f"(allowed: {', '.join(allowed)})")


class Declared(BaseModel):
    """Frozen, every key checked; `parse` turns a validation error into one VermouthError line."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            try:
                check_keys(raw, tuple(cls.model_fields))
            except VermouthError as exc:
                raise ValueError(str(exc)) from None
        return raw

    @classmethod
    def parse(cls, raw: dict, *, where: str = "", name_of=None):
        """`cls(**raw)`, or a VermouthError naming the key (`name_of(key)`: how the user wrote it)."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise one_line(exc, where, name_of) from None


def one_line(exc: ValidationError, where: str = "", name_of=None) -> VermouthError:
    """The first error of `exc` as one line: where, which key, what is wrong with which value."""
    e = exc.errors(include_url=False)[0]
    loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal[")))]
    bad_key = loc[-1:] == ["[key]"]  # the error is about a mapping's key, not its value
    if bad_key:
        loc = loc[:-2]
    key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    shown = (name_of or str)(key) if key else ""
    if bad_key:
        text = f"{shown}: unknown key {e['input']!r} (choose from {_choices(e['ctx']['expected'])})"
    elif e["type"] == "value_error":  # our own validators: their message is already the sentence
        msg = str(e["ctx"]["error"])
        text = f"{shown}: {msg}" if shown and shown not in msg else msg
    elif e["type"] == "literal_error":
        text = f"unknown {shown} {e['input']!r} (choose from {_choices(e['ctx']['expected'])})"
    elif e["type"] == "missing":
        text = f"{shown} is required"
    else:
        text = f"{e['msg'][0].lower() + e['msg'][1:]}, got {e['input']!r}"
        text = f"{shown}: {text}" if shown else text
    return VermouthError(f"{where}: {text}" if where else text)


def _choices(expected: str) -> str:
    """pydantic's "'a', 'b' or 'c'" as "a, b, c", the way every other message lists choices."""
    return re.sub(r"'([^']*)'", r"\1", re.sub(r" or ([^ ]+)$", r", \1", expected))


def choices_of(annotation) -> tuple | None:
    """The values a Literal annotation (or an Optional one) allows; None for any other type."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return typing.get_args(args[0])
    return None


def base_type(annotation) -> type:
    """int, float, bool, str, list or dict: what a field holds, Optional and Literal stripped."""
    choices = choices_of(annotation)
    if choices:
        return type(choices[0])
    origin = typing.get_origin(annotation) or annotation
    if origin in (list, tuple, dict):
        return list if origin is tuple else origin
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return base_type(args[0]) if args else origin
