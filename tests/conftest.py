"""Settings for every test."""

from __future__ import annotations

import pytest

from pdseg_qupath import ui


@pytest.fixture(autouse=True)
def _no_timed_progress_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed progress and keep-alive lines depend on how fast (and how loaded) the machine is: tests that
    count output lines must not see them. Tests of those lines set their own interval."""
    monkeypatch.setattr(ui, "PLAIN_EVERY", 3600.0)
