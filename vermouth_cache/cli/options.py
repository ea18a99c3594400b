"""Click options read from the declarations: an ExtractRequest field, or a pin (an extraction
option that selects cached features), becomes an option with the field's own name, type, choices,
default and help. `extract`, `export` and `train TASK` build their options here, so a choice or a
help text is written once, in the declaration.
"""

from __future__ import annotations

from types import UnionType
from typing import Union, get_args, get_origin

import click

from vermouth_cache.extract.request import Choices, Cli, ExtractRequest, option_name
from vermouth_cache.extract.selection import PINS


def _click_type(field):
    """The click type of a request field: its Choices as a click.Choice, else int, float or text."""
    for rule in field.metadata:
        if isinstance(rule, Choices):
            return click.Choice(list(rule.values()))
    ann = field.annotation
    kind = next(a for a in get_args(ann) if a is not type(None)) if get_origin(ann) in (Union, UnionType) else ann
    # str: text, and tuples of ints typed as "100,200" (the request parses them)
    return kind if kind in (int, float) else str


def request_options(model, *, only: tuple[str, ...] | None = None, help_prefix: str = "", helps: dict | None = None):
    """Click arguments and options for the fields of a pydantic request (all, or `only` these as
    options), in declaration order: the name, type, choices, default and help are the field's own
    (a required field without a default is a required option; tuple defaults show as comma-separated
    text; `helps` replaces a field's help where a command reads it differently)."""
    def decorate(fn):
        for name, field in reversed(list(model.model_fields.items())):
            if only is not None and name not in only:
                continue
            cli = next((m for m in field.metadata if isinstance(m, Cli)), Cli())
            if cli.argument and only is None:
                fn = click.argument(name)(fn)
                continue
            if not cli.option:
                continue
            default = None if field.is_required() else field.default
            if field.annotation is bool:  # a switch: --slide
                fn = click.option(option_name(name), name, is_flag=True, default=default,
                                  help=help_prefix + ((helps or {}).get(name) or field.description or ""))(fn)
                continue
            if isinstance(default, tuple):
                default = ",".join(map(str, default))
            fn = click.option(option_name(name), name, type=_click_type(field), default=default,
                              required=field.is_required() and only is None, metavar=cli.metavar,
                              help=help_prefix + ((helps or {}).get(name) or field.description or ""),
                              show_default=default not in (None, ""))(fn)
        return fn
    return decorate


def typed_options(fields: dict) -> dict:
    """The options of `fields` given on the command line: a request's own defaults (and its method's
    fixed fields) fill the rest."""
    ctx = click.get_current_context()
    return {k: v for k, v in fields.items() if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}


def pin_options(fn):
    """Add every PINS option (`--method`, `--noise-seed`, ...) to a click command (`train TASK`,
    `export`): typed as its ExtractRequest field, no default (absent: any)."""
    for p in reversed(PINS):
        fn = click.option(p.option, p.name, type=_click_type(ExtractRequest.model_fields[p.extract]), default=None,
                          help=p.help)(fn)
    return fn
