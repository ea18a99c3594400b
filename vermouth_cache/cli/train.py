"""`vermouth-cache train TASK`: one command per task of the registry, its options read from the
declarations, a thin layer over `vermouth_cache.train`.

Each command offers, in this order: the task's data options (its `DataOptions` fields: `--dataset`
for `path`, then e.g. `--shots`), `--schedule` and every `TaskSettings` field (default: the
task's Table 7, shown in the help), where the run reads and writes, and the extraction options
that select features (`selection.PINS`). Help texts are the field descriptions, choices their
Literal types; a task added to `vermouth_cache.train.tasks` gets its command with no change here.
"""

from __future__ import annotations

import json
import typing
from dataclasses import fields

import click

from vermouth_cache.cli.options import pin_options
from vermouth_cache.extract.selection import check_pins_apply, pop_pins
from vermouth_cache.models.loading import DEFAULT_CLIP_MODEL
from vermouth_cache.train.common import RunOptions
from vermouth_cache.train.config import base_type, choices_of
from vermouth_cache.train.settings import ON_OFF, SCHEDULES, TASK_OWN, TaskSettings
from vermouth_cache.train.tasks import TASKS
from vermouth_cache.train.tasks.base import Task

RUN_OPTIONS = (
    click.option("--store", required=True, help="The feature store written by `vermouth-cache extract`."),
    click.option("--out", required=True, help="Run directory: config.json, metrics.json, head.safetensors, curve.png."),
    click.option("--sd-model", help="Use only features of this SD model (hub id or directory); needed by "
                                    "--tune-norms, --adapter, --tune-unet and --freeze-prompt-after."),
    click.option("--clip-model", default=DEFAULT_CLIP_MODEL, show_default=True,
                 help="CLIP text model (with projection) for the class-prompt features."),
    click.option("--device", help="cpu, cuda or cuda:N (default: cuda when present)."),
    click.option("--memory-gb", type=float, default=8.0, show_default=True,
                 help="Hold features in (GPU) memory up to this size; larger ones stream from the store."),
    click.option("--overwrite", is_flag=True, help="Replace an existing run in --out."),
    click.option("--quiet", is_flag=True, help="No progress bars."),
)


def flag(name: str) -> str:
    """The command-line spelling of a field: `--shots`, `--text-proj`; a task's `path` is `--dataset`."""
    return "--" + ("dataset" if name == "path" else name.replace("_", "-"))


def _option_of(key: str) -> str:
    """How an error names a data option: `--eval (ADE.layout)` for a key inside `eval`."""
    first, _, rest = key.partition(".")
    return flag(first) + (f" ({rest})" if rest else "")


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _kind(annotation):
    """(click type, whether repeatable) of a field; Literal choices as their text."""
    choices = choices_of(annotation)
    if choices:
        return click.Choice([_shown(c) for c in choices]), False
    kind = base_type(annotation)
    return (str, True) if kind in (list, dict) else (kind, False)


def data_option(name: str, field):
    """A DataOptions field as an option (`path` as the required --dataset), its default shown."""
    if base_type(field.annotation) is bool:  # a switch: --slide
        return click.option(flag(name), name, is_flag=True, default=field.default, help=field.description)
    kind, multiple = _kind(field.annotation)
    default = None if multiple or field.is_required() else field.default
    return click.option(flag(name), name, type=kind, multiple=multiple, required=field.is_required(),
                        default=_shown(default) if isinstance(kind, click.Choice) and default is not None else default,
                        show_default=default is not None, help=field.description)


def setting_option(task: Task, name: str, field):
    """A TaskSettings field; absent from the command line, the task's Table 7 value (or fast one) holds."""
    extra = field.json_schema_extra or {}
    default = f"{task.defaults_from}: {_shown(getattr(task.table7, name))}"
    if name in task.fast:
        default += f"; fast: {_shown(task.fast[name])}"
    help_text = f"{field.description} [{default}]"
    if extra.get("cli") == ON_OFF:
        return click.option(flag(name), name, type=click.Choice(["on", "off"]), help=help_text)
    if base_type(field.annotation) is bool:
        return click.option(flag(name), name, is_flag=True, default=None, help=help_text)
    kind, _ = _kind(field.annotation)
    if isinstance(kind, click.Choice) and type(None) in typing.get_args(field.annotation):
        kind = click.Choice([*kind.choices, "none"])
    return click.option(flag(name), name, type=kind, default=None, help=help_text)


def offered_settings(task: Task) -> list[str]:
    """The settings `train TASK` offers: all but the task-own ones of other tasks (seg's --tune-norms)."""
    return [name for name, f in TaskSettings.model_fields.items() if name not in task.unread
            and ((f.json_schema_extra or {}).get("cli") != TASK_OWN or name in task.own_settings)]


def task_command(task: Task) -> click.Command:
    """`vermouth-cache train NAME` for one Task."""
    data_names = list(task.options.model_fields)
    setting_names = offered_settings(task)
    fast = ", ".join(f"{k.replace('_', ' ')} {_shown(v)}" for k, v in task.fast.items()) or f"as in {task.defaults_from}"
    options = [*(data_option(n, task.options.model_fields[n]) for n in data_names),
               click.option("--schedule", type=click.Choice(SCHEDULES), default="paper", show_default=True,
                            help=f"{task.defaults_from} settings, or a fast schedule ({fast})."),
               *(setting_option(task, n, TaskSettings.model_fields[n]) for n in setting_names),
               *RUN_OPTIONS]

    def run_task(**kw):
        given = _data_values(task, {n: kw.pop(n) for n in data_names})
        settings, opts = _settings_and_run(task, kw, setting_names)
        data = task.options.parse(given, name_of=_option_of).data()
        metrics = task.train(data, settings, opts)
        click.echo(json.dumps(task.summary(metrics), indent=1))
        click.echo(f"run written to {opts.out}: config.json, metrics.json, head.safetensors, curve.png")

    fn = pin_options(run_task)  # --noise-seed, --dtype, --captioner, ...: the extraction options that select features
    for option in reversed(options):
        fn = option(fn)
    return click.command(task.name, help=task.description)(fn)


def _data_values(task: Task, given: dict) -> dict:
    """Command-line values as the DataOptions fields take them: choices back to their values,
    repeatable options also comma-separated; an option not given keeps the field's default."""
    out = {}
    for name, value in given.items():
        choices = choices_of(task.options.model_fields[name].annotation)
        if choices and value is not None:
            value = {_shown(c): c for c in choices}[value]
        if isinstance(value, tuple):
            value = [part for item in value for part in item.split(",") if part.strip()] or None
        if value is not None:
            out[name] = value
    return out


def _settings_and_run(task: Task, kw: dict, setting_names: list[str]) -> tuple[TaskSettings, RunOptions]:
    select = tuple(pop_pins(kw).items())
    schedule = kw.pop("schedule")
    settings = {n: kw.pop(n) for n in setting_names}
    for name in setting_names:
        if (TaskSettings.model_fields[name].json_schema_extra or {}).get("cli") == ON_OFF and settings[name]:
            settings[name] = settings[name] == "on"
    progress = not kw.pop("quiet")
    run = {f.name: kw.pop(f.name) for f in fields(RunOptions) if f.name in kw}
    resolved = task.settings(schedule, **settings)
    check_pins_apply(dict(select), prompt=resolved.prompt, noise=resolved.noise)
    return resolved, RunOptions(**run, progress=progress, select=select)


class TaskGroup(click.Group):
    """The `train` group: its commands are the registry's tasks. Those registered at import are
    added below (so that `cli.main` gives them -q/-v); one registered later is built when asked for."""

    def list_commands(self, ctx) -> list[str]:
        return list(TASKS)

    def get_command(self, ctx, name: str) -> click.Command | None:
        if name not in TASKS:
            return None
        if name not in self.commands:
            self.add_command(task_command(TASKS[name]))
        return self.commands[name]


@click.group(cls=TaskGroup)
def train():
    """Train a head on cached features, one command per task (settings: the paper's Table 7)."""


for _task in TASKS.values():
    train.add_command(task_command(_task))
