"""The one writer of a predicted slide's files, shared by every form of ``predict``.

For an image named ``NAME`` (file names from :func:`pdseg_qupath.core.names.output_name`):

- ``NAME.geojson``: the predicted objects as QuPath GeoJSON (File › Import objects), written last, so
  that its presence means the slide is complete;
- ``NAME.overlay.png`` (``overlay``): the classes over the tissue, with a legend;
- ``NAME.classes.png`` (``classmap``): a palette PNG whose pixel value is the class index (255: no
  prediction), coloured like QuPath.

Every file is written atomically.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pdseg_qupath.core.annotations import ClassMap, stamped
from pdseg_qupath.core.fileio import atomic_write_bytes
from pdseg_qupath.core.names import output_name
from pdseg_qupath.learn.inference import ImagePrediction
from pdseg_qupath.learn.options import PredictOptions
from pdseg_qupath.outputs.overlay import render_overlay
from pdseg_qupath.sources.qupath.geojson import read_pdseg_member, write_geojson


@dataclass
class SlideOutputs:
    geojson: Path
    overlay: Path | None = None
    classmap: Path | None = None


def geojson_path(out_dir: str | Path, image_name: str) -> Path:
    """Where a slide's predictions go (the file whose presence marks the slide done)."""
    return Path(out_dir) / output_name(image_name, ".geojson")


def write_slide_outputs(out_dir: str | Path, image_name: str, pred: ImagePrediction, slide: Any,
                        class_map: ClassMap, opts: PredictOptions, *, title: str,
                        model_id: str | None = None) -> SlideOutputs:
    """Write the files of one predicted slide (``slide`` must still be open: overlays read it).

    ``model_id`` is recorded inside the GeoJSON (top-level ``"pdseg"`` member), so a resumed batch can tell
    whose predictions a file holds (:func:`geojson_model_id`)."""
    out = Path(out_dir)
    done = SlideOutputs(geojson_path(out, image_name))
    if pred.canvas is not None and opts.classmap:
        done.classmap = write_classmap_png(out / output_name(image_name, ".classes.png"), pred.canvas.labels, class_map)
    if pred.canvas is not None and opts.overlay:
        done.overlay = render_overlay(pred.canvas.background(slide, pred.region), pred.canvas.labels, class_map,
                                      out / output_name(image_name, ".overlay.png"), title=title)
    # stamped: marked and fingerprinted, so that corrections made in QuPath after import are told apart
    write_geojson(done.geojson, [stamped(a) for a in (*pred.annotations, *pred.review)],
                  {"model_id": model_id} if model_id else None)
    return done


def geojson_model_id(path: str | Path) -> str | None:
    """The model id recorded in a predictions GeoJSON pdseg wrote, or None."""
    mid = read_pdseg_member(Path(path)).get("model_id")
    return mid if isinstance(mid, str) else None


def write_classmap_png(path: Path, labels: np.ndarray, class_map: ClassMap) -> Path:
    """A palette PNG whose pixel value is the class index (255: no prediction), coloured like QuPath."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    pal = [0] * 768
    for i, c in enumerate(class_map.classes):
        pal[3 * i : 3 * i + 3] = list(c.color)
    pal[765:768] = [255, 255, 255]
    img.putpalette(pal)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=255)
    atomic_write_bytes(path, buf.getvalue())
    return path
