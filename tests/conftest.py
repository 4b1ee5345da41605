"""Settings for every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pdseg_qupath import ui
from pdseg_qupath.backbone.features import PRECISION_ENV


@pytest.fixture(autouse=True)
def _no_timed_progress_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed progress and keep-alive lines depend on how fast (and how loaded) the machine is: tests that
    count output lines must not see them. Tests of those lines set their own interval."""
    monkeypatch.setattr(ui, "PLAIN_EVERY", 3600.0)


@pytest.fixture(autouse=True, scope="session")
def _fp32_features() -> Iterator[None]:
    """Features in fp32 on every machine: "auto" would be bf16 on a CPU with bf16 instructions, so results
    would depend on the CI machine. Session-wide, so that module-scoped fixtures (a model trained once per
    module) see it too. The bf16 path has its own tests (test_backbone_cpu_fast.py), which ask for it by
    argument or clear this variable with monkeypatch."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PRECISION_ENV, "fp32")
        yield
