"""Progress and messages: one package logger, progress bars only on a terminal.

    log = get_logger(__name__)                     # "vermouth_cache.<module>"
    with Progress("extract Demo/train", total=36, unit="img") as bar:
        ...
        bar.update(16)
    # stderr a terminal: a tqdm bar that vanishes when done;
    # otherwise (a log file, a pipe): one line when the stage ends, e.g.
    #   extract Demo/train: 36/36 img, 3.1 s
    # and one every LOG_EVERY seconds while a long stage runs.

The Python API never configures logging: its messages go wherever the application sends the
"vermouth_cache" logger (nowhere, by default, below WARNING). The CLI calls `configure_logging`
once: INFO and up on stderr (`--quiet`: warnings and errors only, `--verbose`: debug too).
Bars show when the caller asked for progress, stderr is a terminal and the package logger lets
INFO through.

Work that runs elsewhere (a sweep's training tasks on dask workers) reports how far it is with
`report_work(done, total)`; whoever runs it installs a `work_sink` to carry that back to its bar.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

LOGGER = "vermouth_cache"
LOG_EVERY = 60.0  # seconds between two progress lines of one long stage when stderr is not a terminal

log = logging.getLogger(LOGGER)


def get_logger(name: str) -> logging.Logger:
    """The package logger's child for a module (`name` = __name__), or the package logger itself."""
    return logging.getLogger(name if name.startswith(LOGGER) else f"{LOGGER}.{name}")


# ---- the CLI's configuration ----------------------------------------------------------------------

class _StderrHandler(logging.Handler):
    """Lines on whatever sys.stderr is when they are written; above a live bar on a terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = sys.stderr
            if _isatty(stream):
                from tqdm import tqdm

                tqdm.write(msg, file=stream)
            else:
                stream.write(msg + "\n")
                stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        if record.levelno < logging.INFO:
            return f"debug: {msg}"
        return msg


def configure_logging(level: int = logging.INFO) -> None:
    """Send the package's messages at `level` and up to stderr, once per process (a second call
    only changes the level)."""
    handler = next((h for h in log.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False  # an application's root handlers must not print each line twice


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bars_shown() -> bool:
    """Draw bars? stderr is a terminal and INFO is not silenced (an unconfigured logger: the API
    without logging set up, where `progress=` alone decides)."""
    return _isatty(sys.stderr) and (log.level == logging.NOTSET or log.isEnabledFor(logging.INFO))


# ---- stages ----------------------------------------------------------------------------------------

class Progress:
    """One stage's progress: a bar on a terminal, else a line at the end (and every LOG_EVERY s).

    `enabled=False` (the API's progress=False): no bar, and the lines go to DEBUG.
    `level`: the level of the lines (DEBUG for inner stages such as one epoch's batches).
    """

    def __init__(self, desc: str, total: float | None = None, unit: str = "it", *, enabled: bool = True,
                 level: int = logging.INFO, every: float = LOG_EVERY, logger: logging.Logger | None = None):
        self.desc, self.total, self.unit = desc, total, unit
        self.level = level if enabled else logging.DEBUG
        self.every = every
        self.logger = logger or log
        self.n = 0.0
        self.postfix: dict = {}
        self.t0 = self._last = time.perf_counter()
        self.closed = False
        self.bar = None
        if enabled and bars_shown():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self._last >= self.every and (self.total is None or self.n < self.total):
            self._line()  # a long stage still running; the end has its own line

    def set(self, n: float) -> None:
        """Set the count (work reported from elsewhere as a running total)."""
        self.update(n - self.n)

    def set_description(self, desc: str) -> None:
        if desc == self.desc:
            return
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc)
        else:
            self.logger.log(self.level, desc)

    def set_postfix(self, postfix: dict | None = None, **values) -> None:
        """As tqdm's: `set_postfix({"loss": 0.5})` or `set_postfix(loss=0.5)`."""
        postfix = {**(postfix or {}), **values}
        self.postfix = dict(postfix)
        if self.bar is not None:
            self.bar.set_postfix(postfix)

    def _count(self) -> str:
        def fmt(v: float) -> str:  # 24, or 1.4 (points, some of them part-way)
            return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"
        return f"{fmt(self.n)}/{fmt(self.total)} {self.unit}" if self.total is not None else f"{fmt(self.n)} {self.unit}"

    def _line(self, end: str = "") -> None:
        self._last = time.perf_counter()
        post = "".join(f", {k} {v}" for k, v in self.postfix.items())
        self.logger.log(self.level, f"{self.desc}: {self._count()}, {self._last - self.t0:.1f} s{post}{end}")

    def close(self, failed: bool = False) -> None:
        """End the stage: its line, unless it failed (closed while an exception propagates: the
        error is the line the user needs)."""
        if self.closed:
            return
        self.closed = True
        failed = failed or sys.exc_info()[0] is not None
        if self.bar is not None:
            self.bar.close()
        if not failed:
            self._line()


def track(items, desc: str, unit: str = "it", *, enabled: bool = True, level: int = logging.INFO):
    """Iterate over `items` with a Progress over them."""
    items = list(items)
    with Progress(desc, len(items), unit, enabled=enabled and bool(items), level=level) as bar:
        for item in items:
            yield item
            bar.update()


# ---- work done elsewhere ---------------------------------------------------------------------------

_sink: Callable[[float], None] | None = None


@contextmanager
def work_sink(sink: Callable[[float], None]):
    """While active, `report_work` calls `sink(fraction done)` (in this process)."""
    global _sink
    saved, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = saved


def report_work(done: float, total: float) -> None:
    """How far the current unit of work is (a training run: steps done of its total)."""
    if _sink is not None and total:
        _sink(min(1.0, done / total))
