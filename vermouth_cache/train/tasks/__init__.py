"""The task registry: every task a head is trained for, one module each in this package.

    from vermouth_cache.train.tasks import get_task, task_settings
    task = get_task("fewshot")                         # the Task declaration (tasks/base.py)
    s = task_settings("fewshot", schedule="fast", lr=1e-4)

To add a task (say depth estimation), add ONE file here, `depth.py`, ending with

    TASK = Task(name="depth", description="Monocular depth: ...", options=DepthOptions,
                table7=TaskSettings(...), fast={...}, prepare=prepare_depth, train_heads=train_depth_heads,
                main_metric="delta1", summary=metric_keys("delta1", "abs_rel"))

and nothing else: every module of this package but base.py is a task and is registered when the
package is imported, so `vermouth-cache train depth` (its options from DepthOptions and
TaskSettings), `task: depth` in a sweep recipe (its dataset keys, what to extract, how to
train, its report column) and `task_settings("depth")` read it from TASKS.
"""

from __future__ import annotations

from vermouth_cache.core.plugins import PluginError, discover
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.train.settings import TaskSettings
from vermouth_cache.train.tasks.base import Task

TASKS: dict[str, Task] = {}  # name -> Task, in the order of the module names


def register(task: Task) -> Task:
    """Add a task (the modules here are added on import); refuses a name already taken."""
    if task.name in TASKS:
        raise VermouthError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise VermouthError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")
    return TASKS[name]


def task_settings(task: str, schedule: str = "paper", **overrides) -> TaskSettings:
    """Table 7 for `task`, then the fast schedule if asked, then `overrides` (None = keep)."""
    return get_task(task).settings(schedule, **overrides)


def _register_modules() -> None:
    for name, declared in discover(__name__, __path__, "TASK", Task, skip=("base",)):
        try:
            register(declared)
        except VermouthError as exc:
            raise PluginError(f"plug-in {__name__}.{name}: {exc}") from None


_register_modules()
