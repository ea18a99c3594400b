"""What a task is: the one declaration (`Task`) that `vermouth-cache train`, `task_settings` and
`sweep` read, and the declaration of its data (`DataOptions`). `tasks/__init__.py` says how to add one.

A task's data options are written once, as pydantic fields of its `DataOptions` subclass:

    class DepthOptions(DataOptions):
        path: str = Field(description="NYU-v2 root (images + depth maps).")   # --dataset / `path:`
        split: str = Field("train", description="Its training split.")         # --split / `split:`

        def data(self) -> DepthData: ...            # what the task's train functions take
        def extract_parts(self) -> list[dict]: ...  # what `extract` must see, as ExtractRequest fields

`vermouth-cache train depth` offers `--dataset` and `--split` (help: the descriptions, choices:
Literal types); a sweep recipe's dataset entry takes `path:` and `split:`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from vermouth_cache.train.common import HeadJob, RunOptions
from vermouth_cache.train.config import Declared
from vermouth_cache.train.runs import raise_failed
from vermouth_cache.train.settings import TaskSettings, resolve_settings


class DataOptions(Declared):
    """The options that pick a task's data: `--dataset` and `--NAME` of `vermouth-cache train TASK`,
    `path:` and `NAME:` of a sweep recipe's dataset entry."""
    path: str = Field(description="The dataset.")

    @abstractmethod
    def data(self) -> Any:
        """The object the task's `prepare` and `train_heads` take (FewshotData, ...)."""

    @abstractmethod
    def extract_parts(self) -> list[dict]:
        """The datasets `extract` must see for this data, as ExtractRequest fields (dataset, split, ...)."""

    def eval_sets(self) -> dict[str, dict]:
        """Datasets a run is evaluated on besides its own, by label; none unless the task has `eval`."""
        return {}


@dataclass(frozen=True)
class Task:
    """One task a head is trained for, as every layer sees it."""
    name: str  # `vermouth-cache train NAME`, `task: NAME` in a sweep recipe
    description: str  # one line: the command's help
    options: type[DataOptions]  # its data: command-line options, recipe keys, what to extract
    table7: TaskSettings  # the paper's settings (Table 7): the defaults of every option
    fast: dict  # the fast schedule's changes to table7
    prepare: Callable[[Any, TaskSettings, RunOptions], None]  # writes what training adds to the store
    train_heads: Callable[[Any, list[HeadJob], RunOptions], list[dict]]  # heads sharing a pass -> their metrics
    main_metric: str  # the headline number of a sweep's table and plots (a key of the metrics)
    summary: Callable[[dict], dict]  # what `vermouth-cache train NAME` prints of the metrics
    per_eval_set: bool = False  # scored on each eval set (metrics["eval"][name]) instead of its own dataset
    own_settings: tuple[str, ...] = field(default=())  # task-own settings (TASK_OWN) its command offers
    unet_lr_scale: dict = field(default_factory=lambda: {"default": 1.0})  # VPD's U-net lr multipliers (--tune-unet)
    percent: bool = True  # the main metric is a share (reported as %); False: in its own unit (RMSE, metres)
    defaults_from: str = "Table 7"  # where table7's values come from, as the help names it ("VPD")
    unread: tuple[str, ...] = field(default=())  # settings its heads never read: not offered, refused in a recipe

    def settings(self, schedule: str = "paper", **overrides) -> TaskSettings:
        """Table 7, then the fast schedule if asked, then `overrides` (None = keep)."""
        return resolve_settings(self.table7, self.fast, schedule, **overrides)

    def train(self, data, s: TaskSettings, opts: RunOptions) -> dict:
        """Train one head into `opts.out`; returns the metrics written to RUN/metrics.json."""
        return raise_failed(self.train_heads(data, [HeadJob(s, opts.out)], opts)[0])

    def scores(self, metrics: dict, label: str, eval_labels: list[str]) -> list[dict]:
        """A run's headline numbers, named as in the recipe: the dataset's own, or one per eval set."""
        if self.per_eval_set:
            return [{"dataset": lab, "metric": self.main_metric, "value": v[self.main_metric]}
                    for lab, v in zip(eval_labels, metrics["eval"].values())]
        return [{"dataset": label, "metric": self.main_metric, "value": metrics[self.main_metric]}]


def metric_keys(*keys: str) -> Callable[[dict], dict]:
    """A `Task.summary` printing these keys of the metrics (those present)."""
    return lambda metrics: {k: metrics[k] for k in keys if k in metrics}
