"""How long work tells the outside world what it is doing, without knowing who listens.

Tasks and engines report through an :class:`Events` object: messages, progress of named steps, and
results worth showing (an epoch of training, a table of scores). The base class does nothing, so a
Python caller who passes none gets a silent run; the command line passes the one from
:mod:`pdseg_qupath.ui`, which draws progress bars in a terminal and plain log lines elsewhere.
"""

from __future__ import annotations

from typing import Any


class Step:
    """Progress of one named step: ``advance`` by work done; ``total`` may be learnt late (or never).

    A step with no total is a phase the user waits on (loading the model, detecting tissue): name it so
    the display can say what is running, e.g. ``with events.step("loading the model"): ...`` (leaving the
    ``with`` block closes the step).
    """

    def __enter__(self) -> "Step":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        """``n`` more units of work are done."""

    def set_total(self, total: int | None, done: int | None = None) -> None:
        """The step has ``total`` units (None: unknown); ``done`` resets the count."""

    def describe(self, text: str) -> None:
        """What the step is busy with now (e.g. the slide in flight)."""

    def close(self) -> None:
        """The step is over (a terminal display may remove its bar)."""


class Events:
    """What a task reports while it runs. Subclass it to show it; this one shows nothing."""

    def message(self, text: str, level: str = "info") -> None:
        """One line for the user. ``level``: ``info``, ``note``, ``warn``, ``error`` or ``done``."""

    def step(self, name: str, total: int | None = None, done: int = 0) -> Step:
        """Start reporting progress of a step named ``name``."""
        return Step()

    def show(self, kind: str, data: Any) -> None:
        """A result to display: ``epoch`` (a training history row; ``data`` is ``(class names, row)``),
        ``scores`` (``(title, metrics)``), ``areas`` (area rows), ``masks`` (a masks result), ``autotune``
        (the cross-validation record of ``train --t auto --blocks auto``)."""

    def section(self, title: str) -> None:
        """A new numbered part of a longer run (the demo's train, predict, evaluate)."""


SILENT = Events()
"""The default listener: reports nothing."""
