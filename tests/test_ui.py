"""What a user sees: progress as plain log lines when the output is not a terminal, bars when it is."""

from __future__ import annotations

import io
import time

from rich.console import Console
from rich.progress import SpinnerColumn, TimeElapsedColumn

from pdseg_qupath import ui


def _events(plain: bool) -> tuple[ui.ConsoleEvents, io.StringIO]:
    buf = io.StringIO()
    return ui.ConsoleEvents(Console(file=buf, width=200), plain=plain), buf


def test_plain_lines_report_progress_with_total_and_eta(monkeypatch):
    monkeypatch.setattr(ui, "PLAIN_EVERY", 0.0)  # a line at every update
    events, buf = _events(plain=True)
    step = events.step("tiles", total=4)
    step.describe("slide.svs")
    step.advance(1)
    step.advance(1)
    step.advance(2)  # finished: not repeated here, only by close()
    step.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("tiles (slide.svs): 1/4 (25 %), elapsed 0:00:00, eta ")
    assert lines[1].startswith("tiles (slide.svs): 2/4 (50 %)")
    assert lines[-1].endswith("4/4 (100 %), elapsed 0:00:00 - done") and len(lines) == 3


def test_each_slide_gets_its_own_total_and_eta(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(ui.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(ui, "PLAIN_EVERY", 0.0)
    events, buf = _events(plain=True)
    step = events.step("tiles", total=None)
    step.set_total(100, done=0)  # slide 1: 100 tiles, slowly
    clock[0] = 100.0
    step.advance(10)
    step.set_total(10, done=0)  # slide 2: 10 tiles at 1 tile/s
    clock[0] = 105.0
    step.advance(5)
    assert buf.getvalue().splitlines()[-1] == "tiles: 5/10 (50 %), elapsed 0:00:05, eta 0:00:05"


def test_plain_lines_are_throttled(monkeypatch):
    monkeypatch.setattr(ui, "PLAIN_EVERY", 3600.0)
    events, buf = _events(plain=True)
    step = events.step("epochs", total=None)
    for _ in range(50):
        step.advance()
    assert buf.getvalue() == ""  # nothing yet within the interval
    step.close()
    assert buf.getvalue().splitlines() == ["epochs: 50, elapsed 0:00:00 - done"]


def test_messages_tables_and_sections():
    events, buf = _events(plain=True)
    events.message("hello [not markup]", "warn")
    events.section("1/3 train")
    events.show("epoch", (["A", "B"], {"epoch": 1, "loss": 0.5, "val_loss": None, "accuracy": 0.9, "miou": 0.8,
                                       "per_class": {"A": {"dice": 0.7, "iou": 0.6}}}))
    events.show("scores", ("scores", {"per_class": {"A": {"dice": 0.5, "iou": 0.4, "pixels": 1234}},
                                      "accuracy": 0.9, "macro_dice": 0.5, "miou": 0.4}))
    text = buf.getvalue()
    assert "hello [not markup]" in text and "1/3 train" in text
    assert "0.70/0.60" in text and "—/—" in text and "1,234" in text


def test_a_terminal_gets_bars_that_live_for_the_session():
    buf = io.StringIO()
    with ui.session(Console(file=buf, width=120, force_terminal=True)) as events:
        assert events.progress is not None
        step = events.step("features", total=2)
        step.advance(2)
        step.close()
    assert events.progress is None and "features" in buf.getvalue()


def _wait_for(predicate, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_plain_heartbeat_names_a_silent_step_and_stops_with_it():
    buf = io.StringIO()
    events = ui.ConsoleEvents(Console(file=buf, width=200), plain=True, every=0.1, name="predict")  # not 10 s
    events.start()
    try:
        events.message("starting")
        with events.step("loading the model"):  # a slow phase that reports nothing itself
            assert _wait_for(lambda: buf.getvalue().count("loading the model: running, elapsed") >= 2)
        lines = buf.getvalue().splitlines()
        assert lines[0] == "starting"
        assert lines[-1].startswith("loading the model: elapsed 0:00:0") and lines[-1].endswith(" - done")
        after = len(lines)
        # the step is over: no more lines about it; between steps the command says it is at work
        assert _wait_for(lambda: "predict: working, elapsed 0:00:0" in buf.getvalue().splitlines()[-1])
        assert not any("loading the model" in line for line in buf.getvalue().splitlines()[after:])
        step = events.step("tiles", total=10)  # a counted step that stalls: its progress so far and elapsed time
        step.describe("slide.svs · detecting tissue")
        assert _wait_for(lambda: "tiles (slide.svs · detecting tissue): 0/10 (0 %), elapsed" in buf.getvalue())
        step.close()
    finally:
        events.stop()
    assert events.heartbeat is None
    stopped = buf.getvalue()
    time.sleep(0.3)  # the session is over: the heartbeat is silent
    assert buf.getvalue() == stopped


def test_plain_heartbeat_waits_while_other_lines_come():
    buf = io.StringIO()
    events = ui.ConsoleEvents(Console(file=buf, width=200), plain=True, every=0.3)
    events.start()
    try:
        with events.step("epochs"):
            for i in range(8):  # a line every 0.05 s: never 0.3 s of silence
                events.message(f"epoch {i}")
                time.sleep(0.05)
    finally:
        events.stop()
    assert "running" not in buf.getvalue()


def test_a_fast_phase_leaves_no_line():
    events, buf = _events(plain=True)
    with events.step("detecting tissue"):
        pass
    assert buf.getvalue() == ""


def test_a_phase_in_a_terminal_shows_a_spinner_and_elapsed_time_then_leaves():
    buf = io.StringIO()
    with ui.session(Console(file=buf, width=120, force_terminal=True)) as events:
        step = events.step("loading the model")
        assert [t.description for t in events.progress.tasks] == ["loading the model"]
        columns = events.progress.columns
        assert isinstance(columns[0], SpinnerColumn) and any(isinstance(c, TimeElapsedColumn) for c in columns)
        task = events.progress.tasks[0]
        assert [str(c.render(task)) for c in columns if isinstance(c, (ui._CountColumn, ui._EtaColumn))] == ["", ""]
        step.close()
        assert events.progress.tasks == []
