"""What the user sees: the one place that imports rich.

:class:`ConsoleEvents` turns what tasks report (:class:`pdseg_qupath.core.events.Events`) into output:

- in a terminal, live progress bars with counts, elapsed time and ETA, coloured messages and tables; a
  spinner and the elapsed time show that a step without a count (loading the model, detecting tissue) is
  still running;
- elsewhere (a log file, nohup, SLURM, CI), plain lines: each step says how far it is at least every
  :data:`PLAIN_EVERY` seconds while it advances, and once when it ends; and a heartbeat (a timer thread)
  writes a keep-alive line for every running step before :data:`PLAIN_EVERY` seconds pass without
  output (between named steps, one line saying the command is at work), so no step is silent for longer.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pdseg_qupath.core.events import Events, Step

PLAIN_EVERY = 10.0
"""Seconds between progress lines when the output is not a terminal, and the longest silence while a step runs."""

STYLES = {"info": "", "note": "cyan", "warn": "yellow", "error": "red", "done": "green"}

# Without a terminal rich assumes 80 columns, which truncates metric tables in logs and CI output.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, soft_wrap=True)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------- steps


class _CountColumn(ProgressColumn):
    """``done/total``; ``done`` alone while the total is unknown; nothing for a phase without a count."""

    def render(self, task: Task) -> Text:
        if task.total is not None:
            return Text(f"{int(task.completed)}/{int(task.total)}", style="progress.download")
        return Text(f"{int(task.completed)}" if task.completed else "", style="progress.download")


class _EtaColumn(ProgressColumn):
    """``eta h:mm:ss`` once there is a total and a rate; empty otherwise (never ``-:--:--``)."""

    max_refresh = 0.5

    def render(self, task: Task) -> Text:
        left = task.time_remaining if task.total is not None and not task.finished else None
        return Text("" if left is None else f"eta {_duration(left)}", style="progress.remaining")


class _BarStep(Step):
    """A step drawn as a rich progress bar; a phase without a count shows a spinner and leaves on close."""

    def __init__(self, progress: Progress, name: str, total: int | None, done: int) -> None:
        self.p, self.name = progress, name
        self.counted = total is not None or done > 0
        self.task = progress.add_task(name, total=total, completed=done)

    def advance(self, n: int = 1) -> None:
        self.counted = True
        self.p.advance(self.task, n)

    def set_total(self, total: int | None, done: int | None = None) -> None:
        self.counted = self.counted or total is not None or bool(done)
        if done == 0:  # a new count (the next slide): its own elapsed time and rate, so its ETA is right
            self.p.reset(self.task, total=total, completed=0)
        else:
            self.p.update(self.task, total=total, **({"completed": done} if done is not None else {}))

    def describe(self, text: str) -> None:
        self.p.update(self.task, description=f"{self.name}: {text}" if text and text != self.name else self.name)

    def close(self) -> None:
        if self.counted:
            self.p.stop_task(self.task)
        else:  # a phase (loading, detecting tissue): gone once over, as a spinner line would be
            self.p.remove_task(self.task)


class _PlainLog:
    """Plain output of one :class:`ConsoleEvents`: one lock for every writer (the steps, the heartbeat
    thread), when the last line went out, and the steps still running."""

    def __init__(self, out: Console, name: str = "") -> None:
        self.out, self.name = out, name
        self.lock = threading.RLock()
        self.t0 = self.last = time.monotonic()
        self.running: list[_PlainStep] = []

    def print(self, *objects: Any, **kwargs: Any) -> None:
        with self.lock:
            self.out.print(*objects, **kwargs)
            self.last = time.monotonic()

    def rule(self, title: str) -> None:
        with self.lock:
            self.out.rule(title)
            self.last = time.monotonic()

    def keep_alive(self, every: float) -> None:
        """After ``every`` seconds without output, one line for each running step (or, between named steps,
        one that says the command is still at work)."""
        with self.lock:
            now = time.monotonic()
            if now - self.last < every:
                return
            for step in list(self.running):
                step.print_line()
            if not self.running:
                self.print(f"{self.name or 'pdseg'}: working, elapsed {_duration(now - self.t0)}", markup=False,
                           highlight=False)


class _Heartbeat:
    """A daemon thread that calls :meth:`_PlainLog.keep_alive` several times per interval until stopped."""

    def __init__(self, log: _PlainLog, every: float) -> None:
        self.log, self.every = log, every
        self.tick = max(0.01, min(0.5, every / 20))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pdseg-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.tick):
            # at 85 %: the tick's delay and the command's own start-up (about 1 s) stay within ``every``
            self.log.keep_alive(0.85 * self.every)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


class _PlainStep(Step):
    """A step written as log lines: ``name (text): done/total (pct), elapsed, eta`` at most every PLAIN_EVERY
    s while it advances (more often never), once when it ends, and by the heartbeat while it is silent. A
    phase without a count that ends before it was ever mentioned ends silently."""

    def __init__(self, log: _PlainLog, name: str, total: int | None, done: int) -> None:
        self.log, self.name, self.total, self.done = log, name, total, done
        self.t0 = self.last = time.monotonic()
        self.start_done = done
        self.text = ""
        self.printed = False
        with log.lock:
            log.running.append(self)

    def advance(self, n: int = 1) -> None:
        with self.log.lock:
            self.done += n
            self._maybe_print()

    def set_total(self, total: int | None, done: int | None = None) -> None:
        with self.log.lock:
            self.total = total
            if done is not None:
                self.done = done
            if done == 0:  # a new count (the next slide): elapsed time and rate start again, so the ETA is right
                self.t0, self.start_done = time.monotonic(), 0
            self._maybe_print()

    def describe(self, text: str) -> None:
        self.text = text

    def close(self, how: str = "done") -> None:
        with self.log.lock:
            if self not in self.log.running:
                return
            self.log.running.remove(self)
            if self.printed or self.total is not None or self.done:
                self.print_line(final=how)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close("stopped" if exc_type is not None else "done")

    def line(self, final: str | bool = False) -> str:
        final = "done" if final is True else final
        elapsed = time.monotonic() - self.t0
        head = f"{self.name}{(' (' + self.text + ')') if self.text else ''}: "
        if self.total:
            count = f"{self.done}/{self.total} ({100 * self.done / self.total:.0f} %)"
        elif self.total is not None or self.done:
            count = f"{self.done}"
        else:
            count = "" if final else "running"
        parts = [count] if count else []
        parts.append(f"elapsed {_duration(elapsed)}")
        rate_done = self.done - self.start_done
        if not final and self.total and rate_done > 0 and self.done < self.total:
            parts.append(f"eta {_duration(elapsed / rate_done * (self.total - self.done))}")
        return head + ", ".join(parts) + (f" - {final}" if final else "")

    def _maybe_print(self) -> None:
        finished = self.total is not None and self.done >= self.total  # close() says it once, as done
        if not finished and time.monotonic() - self.last >= PLAIN_EVERY:
            self.print_line()

    def print_line(self, final: str | bool = False) -> None:
        with self.log.lock:
            self.last = time.monotonic()
            self.printed = True
            self.log.print(self.line(final), markup=False, highlight=False)


# ------------------------------------------------------------------------------------------ events


class ConsoleEvents(Events):
    """Events shown on a console: bars in a terminal, plain lines elsewhere. Use :func:`session`.

    ``every``: seconds of silence before the heartbeat writes a keep-alive line in plain mode (default
    :data:`PLAIN_EVERY`); ``name``: the command, for that line between named steps."""

    def __init__(self, out: Console | None = None, plain: bool | None = None, every: float | None = None,
                 name: str = "") -> None:
        self.out = out or console
        self.plain = (not self.out.is_terminal) if plain is None else plain
        self.every = every
        self.progress: Progress | None = None
        self.log = _PlainLog(self.out, name)
        self.heartbeat: _Heartbeat | None = None
        self._epochs: EpochTable | None = None

    def start(self) -> None:
        if not self.plain:
            self.progress = Progress(SpinnerColumn(finished_text=" "), TextColumn("[bold blue]{task.description}"),
                                     BarColumn(), _CountColumn(), TimeElapsedColumn(), _EtaColumn(),
                                     console=self.out, transient=False)
            self.progress.start()
        elif self.heartbeat is None:
            self.heartbeat = _Heartbeat(self.log, self.every if self.every is not None else PLAIN_EVERY)

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def message(self, text: str, level: str = "info") -> None:
        style = STYLES.get(level, "")
        self.log.print(text, style=style or None, markup=False, highlight=False)

    def step(self, name: str, total: int | None = None, done: int = 0) -> Step:
        if self.progress is not None:
            return _BarStep(self.progress, name, total, done)
        return _PlainStep(self.log, name, total, done)

    def show(self, kind: str, data: Any) -> None:
        if kind == "epoch":
            names, row = data
            if self._epochs is None or self._epochs.names != list(names):
                self._epochs = EpochTable(names, self.log)
            self._epochs.add(row)
        elif kind == "scores":
            title, metrics = data
            self.log.print(scores_table(metrics, title))
        elif kind == "areas":
            self.log.print(areas_table(data))
        elif kind == "masks":
            self.log.print(masks_table(*data))
        elif kind == "autotune":
            self.log.print(autotune_table(data))

    def section(self, title: str) -> None:
        self.log.rule(f"[bold]{title}")


@contextmanager
def session(out: Console | None = None, plain: bool | None = None, name: str = "") -> Iterator[ConsoleEvents]:
    """Events for one command (``name``): the progress display (or the plain heartbeat) lives as long as the
    ``with`` block."""
    events = ConsoleEvents(out, plain, name=name)
    events.start()
    try:
        yield events
    finally:
        events.stop()


# ------------------------------------------------------------------------------------------- tables


class EpochTable:
    """A table that grows one row per epoch: the header prints once, then aligned rows."""

    def __init__(self, class_names: Sequence[str], out: Console | _PlainLog) -> None:
        self.names = list(class_names)
        self.out = out
        self.first = True

    def _table(self) -> Table:
        t = Table(show_header=self.first, box=None, pad_edge=False, header_style="bold")
        for name, w in (("epoch", 5), ("loss", 7), ("val loss", 8), ("acc", 6), ("mIoU", 6)):
            t.add_column(name, justify="right", min_width=w, max_width=w)
        for n in self.names:
            label = f"{n[:14]} Dice/IoU"
            w = max(11, len(label))
            t.add_column(label, justify="right", min_width=w, max_width=w)
        return t

    def add(self, row: dict) -> None:
        t = self._table()
        cells = [str(row["epoch"]), _fmt(row["loss"]), _fmt(row.get("val_loss")), _fmt(row["accuracy"]),
                 _fmt(row["miou"])]
        for n in self.names:
            pc = row["per_class"].get(n, {})
            cells.append(f"{_fmt(pc.get('dice'), 2)}/{_fmt(pc.get('iou'), 2)}")
        t.add_row(*cells)
        self.out.print(t)
        self.first = False


def scores_table(metrics: dict, title: str) -> Table:
    """Per-class Dice/IoU/pixels plus the summary line of a metrics.json dictionary."""
    t = Table(title=title, box=box.SIMPLE_HEAD)
    for c, j in (("class", "left"), ("Dice", "right"), ("IoU", "right"), ("pixels", "right")):
        t.add_column(c, justify=j)  # type: ignore[arg-type]
    for name, pc in metrics["per_class"].items():
        t.add_row(name, _fmt(pc["dice"]), _fmt(pc["iou"]), f"{pc['pixels']:,}")
    t.add_section()
    t.add_row("accuracy", _fmt(metrics["accuracy"]), "", "")
    t.add_row("macro Dice / mIoU", _fmt(metrics["macro_dice"]), _fmt(metrics["miou"]), "")
    return t


def autotune_table(record: dict) -> Table:
    """``train --t auto --blocks auto``: each candidate's macro Dice per held-out fold and its mean."""
    k = record["method"]["folds"]
    t = Table(title=f"image-wise cross-validation ({k} folds, macro Dice)", box=box.SIMPLE_HEAD)
    for c in ("t", "blocks", *(f"fold {i + 1}" for i in range(k)), "mean", ""):
        t.add_column(c, justify="left" if c in ("t", "blocks", "") else "right")
    for j, c in enumerate(record["candidates"]):
        mark = []
        if j == 0:
            mark.append("default")
        if (c["t"], c["blocks"]) == (record["choice"]["t"], record["choice"]["blocks"]):
            mark.append("chosen")
        t.add_row(",".join(map(str, c["t"])), ",".join(map(str, c["blocks"])),
                  *(_fmt(v) for v in c["fold_scores"]), _fmt(c["mean"]), " · ".join(mark))
    return t


def areas_table(rows: Sequence[Any], title: str = "predicted areas") -> Table:
    """Area (mm²), objects and mean probability per image and class."""
    t = Table(title=title, box=box.SIMPLE_HEAD)
    for c, j in (("image", "left"), ("class", "left"), ("area mm²", "right"), ("objects", "right"),
                 ("mean prob.", "right")):
        t.add_column(c, justify=j)  # type: ignore[arg-type]
    for r in rows:
        t.add_row(r.image, r.class_name, f"{r.area_mm2:.4f}", str(r.objects), _fmt(r.mean_probability, 2))
    return t


def masks_table(result: Any, mpp: float, out: Any) -> Table:
    """Labelled pixels per class, files and repairs per image of a ``masks`` run."""
    table = Table(title=f"Masks at {mpp:g} µm/px → {out}")
    table.add_column("image")
    for name in result.class_map.names:
        table.add_column(f"{name} px", justify="right")
    for name in ("ignored px", "files", "repaired / skipped"):
        table.add_column(name, justify="right")
    table.add_column("status")
    for row in result.rows:
        stats = row.stats
        cells = [f"{stats.pixels.get(n, 0):,}" if stats else "" for n in result.class_map.names]
        table.add_row(
            row.image, *cells,
            f"{stats.ignored_pixels:,}" if stats else "",
            str(len(stats.files)) if stats else "",
            f"{row.report.repaired} / {row.report.skipped}" if row.report else "",
            "[green]ok" if row.error is None else f"[red]{row.error}",
        )
    return table
