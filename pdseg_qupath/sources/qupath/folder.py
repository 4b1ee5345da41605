"""A folder of images with sidecar QuPath GeoJSON: the adapter for users without a QuPath project.

Layout (non-recursive)::

    root/slide1.svs    root/slide1.geojson        (also slide1.json or slide1.svs.geojson)
    root/tile.png      (no sidecar: listed, zero annotations)
    root/pdseg/predictions/slide1.svs.geojson     (written by pdseg; the user's sidecar is never touched)

Predictions go to their own file so that "File > Import objects" in QuPath, or the ``groovy/`` scripts,
can bring them in without risk to the hand-drawn annotations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pdseg_qupath.core.annotations import RGB, Annotation, ReadReport, is_pdseg_name, stamped
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import atomic_copy, atomic_write_text
from pdseg_qupath.core.names import PDSEG_DIR, output_name
from pdseg_qupath.sources.base import IMAGE_SUFFIXES, ImageRecord, WriteReport
from pdseg_qupath.sources.qupath.geojson import (
    annotation_to_feature,
    dump_feature_collection,
    load_json,
    raw_features,
    read_geojson,
)

PREDICTIONS_DIR = Path(PDSEG_DIR) / "predictions"


class GeoJSONFolder:
    """:class:`~pdseg_qupath.sources.base.AnnotationSource` over ``root``: images plus ``<image>.geojson`` sidecars."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise PdsegError(f"{self.root}: not a folder. Give a folder of images with <name>.geojson beside them.")
        self._sidecars: dict[str, Path] = {}
        self._notes: dict[str, list[str]] = {}
        self._records: list[ImageRecord] | None = None

    # --------------------------------------------------------------------------------------- listing

    def images(self) -> list[ImageRecord]:
        """Images sorted by name; a sidecar without its image is listed with ``error`` set."""
        if self._records is None:
            self._records = self._scan()
        return list(self._records)

    def _scan(self) -> list[ImageRecord]:
        from pdseg_qupath.core.slide import (
            probe,  # lazily: the folder listing must not pay for slide libraries up front
        )

        try:
            files = sorted(p for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))
        except OSError as e:
            raise PdsegError(f"{self.root}: cannot list the folder ({e.strerror or e})") from None
        by_name = {p.name: p for p in files}
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        claimed: set[str] = set()
        records: list[ImageRecord] = []
        for image in images:
            candidates = [f"{image.name}.geojson", f"{image.stem}.geojson", f"{image.stem}.json"]
            found = [by_name[c] for c in candidates if c in by_name]
            claimed.update(p.name for p in found)
            if found:
                self._sidecars[image.name] = found[0]
                if len(found) > 1:
                    self._notes[image.name] = [
                        f"{image.name}: using {found[0].name}; also found {', '.join(p.name for p in found[1:])} "
                        "(ignored, merge or remove it)"
                    ]
            record = ImageRecord(name=image.name, uri=image.resolve().as_uri(), path=image)
            try:
                record.width, record.height, record.mpp = probe(image)
            except PdsegError as e:
                record.error = str(e)
            except Exception as e:  # a broken file must not stop the other images
                record.error = f"{image}: cannot open the image ({type(e).__name__}: {e})"
            records.append(record)
        self._refuse_shared_sidecars(records)
        for sidecar in files:
            if sidecar.suffix.lower() == ".geojson" and sidecar.name not in claimed:
                name = sidecar.name[: -len(sidecar.suffix)]
                self._sidecars[name] = sidecar
                records.append(
                    ImageRecord(
                        name=name,
                        uri=sidecar.resolve().as_uri(),
                        path=None,
                        error=f"{sidecar}: image file not found (expected an image named {name}.<ext> beside it, "
                        f"one of {', '.join(IMAGE_SUFFIXES)})",
                    )
                )
        records.sort(key=lambda r: r.name)
        return records

    def _refuse_shared_sidecars(self, records: list[ImageRecord]) -> None:
        """A sidecar named after the stem that two images share (``a.geojson`` beside ``a.png`` and ``a.tif``)
        could hold either one's annotations: both images get an error instead of a guess."""
        users: dict[Path, list[ImageRecord]] = {}
        for r in records:
            if r.name in self._sidecars:
                users.setdefault(self._sidecars[r.name], []).append(r)
        for sidecar, rs in users.items():
            if len(rs) > 1:
                names = " and ".join(r.name for r in rs)
                for r in rs:
                    del self._sidecars[r.name]
                    r.error = (f"{sidecar}: could hold the annotations of {names}; rename it after its image "
                               f"(e.g. {rs[0].name}.geojson) so that it belongs to one")

    def sidecar(self, image: ImageRecord) -> Path | None:
        """The GeoJSON file holding ``image``'s annotations, if any."""
        self.images()
        return self._sidecars.get(image.name)

    # --------------------------------------------------------------------------------------- reading

    def read_annotations(self, image: ImageRecord) -> tuple[list[Annotation], ReadReport]:
        """Annotation objects of the sidecar; detections, cells, tiles and TMA cores are counted and left out."""
        path = self.sidecar(image)
        if path is None:
            return [], ReadReport(source=image.name)
        objects, report = read_geojson(path)
        report.messages[:0] = self._notes.get(image.name, [])
        annotations = [a for a in objects if a.object_type == "annotation"]
        others = len(objects) - len(annotations)
        if others:
            report.read -= others
            report.skipped_other += others
            report.messages.append(
                f"{path}: {others} non-annotation object(s) (detections, cells, tiles or TMA cores) left out; "
                "pdseg trains on annotations only"
            )
        return annotations, report

    def class_colors(self) -> dict[str, RGB]:
        """Class colours as the sidecars give them (first seen wins); unreadable sidecars are passed over."""
        self.images()
        colors: dict[str, RGB] = {}
        for path in sorted(set(self._sidecars.values())):
            try:
                objects, _ = read_geojson(path)
            except PdsegError:
                continue  # read_annotations reports it where it matters
            for a in objects:
                if a.classification and a.color is not None:
                    colors.setdefault(a.classification, a.color)
        return colors

    # --------------------------------------------------------------------------------------- writing

    def predictions_path(self, image: ImageRecord) -> Path:
        """``root/pdseg/predictions/<image name>.geojson``: the name every per-image output gets
        (:func:`pdseg_qupath.core.names.output_name`), which ``groovy/import_predictions.groovy`` reads."""
        return self.root / PREDICTIONS_DIR / output_name(image.name, ".geojson")

    def write_predictions(self, image: ImageRecord, annotations: Sequence[Annotation]) -> WriteReport:
        """Replace earlier pdseg objects in the image's predictions file; other objects are kept verbatim.

        Objects whose name lacks the ``pdseg`` marker get one (``"pdseg <name or class>"``), so that the
        next write replaces them.

        The previous file is copied to ``<file>.bak`` first. Objects the user added to that file (points,
        detections, anything) are kept exactly as their JSON was, not re-read through the annotation model.
        """
        target = self.predictions_path(image)
        report = WriteReport(image=image.name, target=target)
        kept: list[Any] = []
        if target.exists():
            for feature in raw_features(load_json(target), str(target)):
                if _is_pdseg_feature(feature):
                    report.removed += 1
                else:
                    kept.append(feature)
            backup = target.with_name(target.name + ".bak")
            try:
                atomic_copy(target, backup)  # a link at <file>.bak is replaced, never written through
            except PdsegError as e:
                raise PdsegError(f"{backup}: cannot back up the predictions ({e}); nothing was written") from None
            report.backup = backup
        # Every object written is marked and fingerprinted (as the project adapter does), so that a later
        # write can replace it and a corrected copy (imported into QuPath, edited, exported) is told apart.
        new = [annotation_to_feature(stamped(a)) for a in annotations if not a.geometry.is_empty]
        atomic_write_text(target, dump_feature_collection(kept + new))
        report.kept = len(kept)
        report.added = len(new)
        report.messages.append(f"{target}: {report.added} pdseg object(s) written, {report.removed} replaced, "
                               f"{report.kept} other object(s) kept")
        return report

    def close(self) -> None:
        """Nothing to release: every write is complete when it returns."""

    def __enter__(self) -> "GeoJSONFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_pdseg_feature(feature: Any) -> bool:
    props = feature.get("properties") if isinstance(feature, dict) else None
    return is_pdseg_name(props.get("name") if isinstance(props, dict) else None)
