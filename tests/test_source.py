"""The adapter-independent helpers of source.py."""

from __future__ import annotations

import pytest

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.sources.base import ImageRecord, select_images

RECORDS = [ImageRecord("a.svs", "file:///a.svs"), ImageRecord("b.svs", "file:///b.svs"), ImageRecord("c.png", "file:///c.png")]


def test_select_images_keeps_source_order() -> None:
    assert [r.name for r in select_images(RECORDS, ["c.png", "a.svs"])] == ["a.svs", "c.png"]
    assert select_images(RECORDS, None) == RECORDS


def test_unknown_image_name_lists_the_known_ones() -> None:
    with pytest.raises(PdsegError, match=r"\['x.svs'\].*'a.svs', 'b.svs', 'c.png'"):
        select_images(RECORDS, ["a.svs", "x.svs"])
