"""A QuPath project (``.qpproj``) as an :class:`~pdseg_qupath.sources.base.AnnotationSource`, through paquo 0.9.

paquo starts QuPath's JVM when imported, so it is imported here lazily, in the constructor: the rest of
pdseg works without QuPath. Every paquo call below was checked against paquo 0.9's source and a real
QuPath 0.6 core; the traps it handles are marked ``paquo trap``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pdseg_qupath.core.annotations import RGB, Annotation, ReadReport, default_color, is_pdseg_name, prediction_name
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.geometry import clean_geometry
from pdseg_qupath.sources.base import ImageRecord, WriteReport
from pdseg_qupath.sources.qupath.backup import ProjectBackup, qpdata_is_damaged, unreadable_data_message
from pdseg_qupath.sources.qupath.qpproj import (
    missing_classes,
    mpp_from_builder,
    mpp_from_pair,
    path_from_file_uri,
    project_file,
    read_server_builders,
    read_server_json,
    server_problem,
    size_from_builder,
    split_class_name,
)

__all__ = ["QuPathProjectSource", "create_project", "NO_QUPATH_HELP"]

NO_QUPATH_HELP = (
    "Reading a QuPath project needs QuPath itself (paquo drives QuPath's Java code). Install QuPath 0.5 or "
    "0.6 (https://qupath.github.io, or `python -m paquo get_qupath --install-path DIR 0.6.0`) and set "
    "PAQUO_QUPATH_DIR to its folder. Without QuPath, export the annotations as GeoJSON with "
    "groovy/export_annotations.groovy and use the folder of slides + <image>.geojson instead."
)


class _Paquo:
    """The few paquo names the adapter uses, imported on first use (this starts the JVM)."""

    def __init__(self) -> None:
        try:
            from paquo.classes import QuPathPathClass
            from paquo.hierarchy import QuPathPathObjectHierarchy
            from paquo.images import QuPathImageType
            from paquo.pathobjects import QuPathPathAnnotationObject
            from paquo.projects import QuPathProject
        except Exception as e:  # paquo raises ValueError/OSError/RuntimeError when QuPath is not found
            raise PdsegError(f"QuPath not available ({type(e).__name__}: {e}). {NO_QUPATH_HELP}") from e
        self.QuPathProject = QuPathProject
        self.QuPathPathClass = QuPathPathClass
        self.QuPathPathObjectHierarchy = QuPathPathObjectHierarchy
        self.QuPathPathAnnotationObject = QuPathPathAnnotationObject
        self.QuPathImageType = QuPathImageType


def _server_mpp(entry: Any) -> float | None:
    """µm/px from QuPath's image server. paquo trap: there is no public paquo API, and an uncalibrated image (PNG)
    reports 1.0 in unit ``px``, so ``hasPixelSizeMicrons()`` decides."""
    try:
        cal = entry._image_server.getMetadata().getPixelCalibration()
        if not bool(cal.hasPixelSizeMicrons()):
            return None
        return mpp_from_pair(float(cal.getPixelWidthMicrons()), float(cal.getPixelHeightMicrons()))
    except Exception:  # e.g. paquo's server.json stand-in has no getPixelCalibration
        return None


def _slide_mpp(path: Path) -> float | None:
    """Last resort: the pixel size recorded in the slide file itself."""
    try:
        from pdseg_qupath.core.slide import probe

        return probe(path)[2]
    except Exception:
        return None


def _object_id(obj: Any) -> str | None:
    try:
        return str(obj.java_object.getID())  # QuPath >= 0.4; paquo 0.9 has no public id accessor
    except Exception:
        return None


def _object_color(obj: Any) -> RGB | None:
    try:
        rgb = obj.java_object.getColor()
        if rgb is None:
            return None
        v = int(rgb)
        return ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    except Exception:
        return None


def _class_rgb(pc: Any) -> RGB | None:
    try:
        color = pc.color if pc is not None else None
        return tuple(int(c) for c in color.to_rgb()) if color is not None else None  # type: ignore[return-value]
    except Exception:
        return None


_SKIP_COUNTERS = {"point": "skipped_points", "line": "skipped_lines", "empty": "skipped_empty"}


def _measurements(obj: Any) -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in obj.measurements.items()}
    except Exception:
        return {}


class QuPathProjectSource:
    """Images and annotations of a QuPath project; writes predictions back as pdseg-named annotations.

    Open read-only unless ``writable``. Close the project in QuPath before writing: QuPath would
    overwrite the changes when it saves.
    """

    def __init__(self, path: str | Path, *, writable: bool = False) -> None:
        self.path = project_file(path)
        self.project_dir = self.path.parent
        self.writable = writable
        self._pq = _Paquo()
        try:
            self._qp = self._pq.QuPathProject(self.path, mode="r+" if writable else "r")
        except Exception as e:
            raise PdsegError(
                f"{self.path}: QuPath could not open this project ({type(e).__name__}: {e}). "
                "Check that it opens in QuPath; a project saved by a newer QuPath needs that version."
            ) from e
        self._entries: dict[tuple[str, str], Any] = {}
        self._backup = ProjectBackup(self.project_dir)
        self._written: list[Any] = []
        self._closed = False

    # ------------------------------------------------------------------------------------------ reading

    def images(self) -> list[ImageRecord]:
        builders = read_server_builders(self.path)
        records = []
        for i, entry in enumerate(self._qp.images):
            rec = self._record(i, entry, builders)
            self._entries.setdefault((rec.name, rec.uri), entry)
            records.append(rec)
        return records

    def _record(self, index: int, entry: Any, builders: dict[str, dict]) -> ImageRecord:
        rec = ImageRecord(name=f"image #{index + 1}", uri="")
        try:
            rec.name = entry.image_name
            rec.uri = entry.uri
            rec.path = path_from_file_uri(rec.uri)
            # what QuPath recorded: the project file first, then the entry's server.json
            recorded = [builders.get(str(entry.entry_id)), read_server_json(entry.entry_path)]
            size = next((s for s in map(size_from_builder, recorded) if s), None)
            if size:
                rec.width, rec.height = size
            rec.error = self._unusable(rec, entry)
            problem = server_problem(recorded[0])
            if rec.error is None and problem:
                rec.error = (
                    f"{rec.name}: {problem}, so its annotation coordinates do not match the file pdseg reads "
                    f"({rec.path}). Add the file to the project as it is, or export that view as its own file."
                )
            if rec.error is None:
                # Only for images QuPath can open: for a missing file QuPath cannot build the server and
                # paquo falls back through deprecated readers; the recorded metadata above is used instead.
                rec.width, rec.height = int(entry.width), int(entry.height)
                rec.mpp = _server_mpp(entry)
            if rec.mpp is None:
                rec.mpp = next((m for m in map(mpp_from_builder, recorded) if m), None)
            if rec.mpp is None and rec.error is None and rec.path is not None:
                rec.mpp = _slide_mpp(rec.path)
        except Exception as e:  # one broken entry must not stop the others
            rec.error = f"{rec.name}: QuPath could not read this image ({type(e).__name__}: {e})"
        return rec

    @staticmethod
    def _unusable(rec: ImageRecord, entry: Any) -> str | None:
        if rec.path is None:
            return f"{rec.name}: not a local file ({rec.uri}); pdseg reads slides from local or mounted disks"
        try:
            readable = bool(entry.is_readable())
        except Exception:
            readable = False
        if readable:
            return None
        return (
            f"{rec.name}: image file not found at {rec.path}. If the slide moved, fix its path in QuPath "
            "(open the project and use 'Update URIs') or with paquo: "
            "QuPathProject(project, mode='r+').update_image_paths(uri2uri={old_uri: new_uri})."
        )

    def _entry(self, image: ImageRecord) -> Any:
        key = (image.name, image.uri)
        if key not in self._entries:
            self.images()
        try:
            return self._entries[key]
        except KeyError:
            raise PdsegError(f"{self.path}: no image named {image.name!r} with URI {image.uri}") from None

    def read_annotations(self, image: ImageRecord) -> tuple[list[Annotation], ReadReport]:
        entry = self._entry(image)
        report = ReadReport(source=f"{self.path} [{image.name}]")
        self._check_data(entry, image)
        try:
            objects = list(self._hierarchy_for_reading(entry).annotations)
        except Exception as e:
            if getattr(entry, "entry_path", None) is not None and (Path(entry.entry_path) / "data.qpdata").exists():
                raise PdsegError(unreadable_data_message(self.project_dir, entry.entry_path, image.name,
                                                         f"{type(e).__name__}: {e}")) from None
            raise PdsegError(
                f"{self.path}: could not read the objects of image {image.name!r} ({type(e).__name__}: {e}). "
                "Check that the image opens in QuPath."
            ) from e
        out: list[Annotation] = []
        for obj in objects:
            try:
                raw = obj.roi
            except Exception as e:
                report.skipped_other += 1
                report.messages.append(f"{image.name}: an object's ROI could not be converted ({e}); skipped")
                continue
            geom, what = clean_geometry(raw)
            if what != "ok":
                label = f"{image.name}: {obj.name or _object_id(obj) or 'annotation'}"
            if geom is None:
                counter = _SKIP_COUNTERS.get(what, "skipped_other")
                setattr(report, counter, getattr(report, counter) + 1)
                report.messages.append(f"{label} skipped: {what} has no area")
                continue
            if what == "repaired":
                report.repaired += 1
                report.messages.append(f"{label}: invalid geometry repaired")
            out.append(self._annotation(obj, geom))
        report.read = len(out)
        return out, report

    def _check_data(self, entry: Any, image: ImageRecord) -> None:
        """A 0-byte data.qpdata (a write killed half-way) is an error that says how to restore it."""
        entry_dir = getattr(entry, "entry_path", None)
        if qpdata_is_damaged(entry_dir):
            raise PdsegError(unreadable_data_message(self.project_dir, entry_dir, image.name, "an empty file"))

    def _hierarchy_for_reading(self, entry: Any) -> Any:
        """The entry's objects; straight from data.qpdata when the image file is missing.

        Read-only, paquo reads data.qpdata itself. Writable, it goes through QuPath's ImageData, which may
        try to open the missing image (QuPath 0.6 renames the lazily loaded server); readHierarchy() does not.
        """
        if not self.writable or self._readable(entry):
            return entry.hierarchy
        return self._pq.QuPathPathObjectHierarchy(
            entry.java_object.readHierarchy(), readonly=True, image_name=entry.image_name
        )

    def _annotation(self, obj: Any, geom: Any) -> Annotation:
        pc = obj.path_class
        a = Annotation(
            geometry=geom,
            classification=pc.id if pc is not None else None,  # id = toString(): "Parent: Child" if derived
            color=_class_rgb(pc),
            name=obj.name,
            locked=bool(obj.locked),
            measurements=_measurements(obj),
            object_color=_object_color(obj),
        )
        oid = _object_id(obj)
        if oid:
            a.id = oid
        return a

    def class_colors(self) -> dict[str, RGB]:
        out: dict[str, RGB] = {}
        for pc in self._qp.path_classes:
            rgb = _class_rgb(pc)
            if rgb is not None:
                out[pc.id] = rgb
        return out

    # ------------------------------------------------------------------------------------------ writing

    def write_predictions(self, image: ImageRecord, annotations: Sequence[Annotation]) -> WriteReport:
        if not self.writable:
            raise PdsegError(f"{self.path}: opened read-only; open it writable to write predictions back")
        entry = self._entry(image)
        if not self._readable(entry):
            raise PdsegError(
                f"{image.name}: QuPath cannot open the image file ({image.uri}) and saves objects only for "
                "images it can open. Fix the image path first ('Update URIs' in QuPath)."
            )
        self._check_data(entry, image)  # never write over (or back up) damaged objects
        report = WriteReport(image=image.name)
        report.backup = self._backup.ensure(entry.entry_path)  # before any change; raises if it fails
        classes = self._ensure_classes(annotations)
        hierarchy = entry.hierarchy
        with hierarchy.no_autoflush():  # one hierarchy event for the whole batch, not one per object
            old = [obj for obj in hierarchy.annotations if is_pdseg_name(obj.name)]
            report.kept = len(hierarchy.annotations) - len(old)
            for obj in old:
                hierarchy.annotations.discard(obj)  # keeps any children (keepChildren=True in paquo)
            report.removed = len(old)
            for a in annotations:
                geom, what = clean_geometry(a.geometry)
                if geom is None:
                    report.messages.append(f"{image.name}: a {a.classification} prediction was skipped ({what})")
                    continue
                measurements, bad = {}, []
                for k, v in a.measurements.items():
                    try:
                        measurements[str(k)] = float(v)  # paquo trap: an int measurement raises TypeError
                    except (TypeError, ValueError):
                        bad.append(str(k))
                if bad:
                    report.messages.append(f"{image.name}: non-numeric measurements dropped: {bad}")
                obj = self._pq.QuPathPathAnnotationObject.from_shapely(
                    geom, classes.get(a.classification) if a.classification else None, measurements
                )
                obj.name = prediction_name(a)
                hierarchy.annotations.add(obj)
                report.added += 1
        self._save(entry, changed=bool(report.added or report.removed))
        return report

    @staticmethod
    def _readable(entry: Any) -> bool:
        try:
            return bool(entry.is_readable())
        except Exception:
            return False

    def _ensure_classes(self, annotations: Sequence[Annotation]) -> dict[str, Any]:
        """Path class objects for the annotations' classes, added to the project's class list if missing.

        paquo trap: classes are objects, not strings, and a new project's list is empty, so the full list
        (existing + new) is assigned. (QuPath 0.6's setPathClasses ignores a same-size list: we only grow it.)
        """
        colors: dict[str, RGB] = {}
        for a in annotations:
            if a.classification:
                colors.setdefault(a.classification, a.color or default_color(a.classification))
        existing = list(self._qp.path_classes)
        by_name = {pc.id: pc for pc in existing}
        added = []
        for name in missing_classes(by_name, colors):
            by_name[name] = self._path_class(name, colors[name])
            added.append(by_name[name])
        if added:
            self._qp.path_classes = existing + added
        return {n: by_name[n] for n in colors}

    def _path_class(self, name: str, color: RGB | None) -> Any:
        parts = split_class_name(name)
        if not parts:
            raise PdsegError(f"{self.path}: invalid class name {name!r}")
        parent = None
        for part in parts[:-1]:
            parent = self._pq.QuPathPathClass(part, parent=parent)
        return self._pq.QuPathPathClass(parts[-1], color=color, parent=parent)

    def _save(self, entry: Any, changed: bool) -> None:
        try:
            if changed and not entry.is_changed():
                # paquo fell back to a hierarchy detached from the image data: saving would drop the edits
                raise RuntimeError("QuPath did not register the changes to this image's objects")
            entry.save()  # paquo saves only if the image is readable and the hierarchy changed
            self._qp.save(images=False)  # project file and class list; images=False: see close()
        except Exception as e:
            raise PdsegError(
                f"{self.path}: saving failed ({type(e).__name__}: {e}). The files as they were before this "
                f"session are in {self._backup.folder}."
            ) from e
        if entry not in self._written:
            self._written.append(entry)

    def close(self) -> None:
        """Save what this session changed (when writable) and release the project.

        Only the images written to are saved, and nothing at all if nothing was written:
        ``QuPathProject.save()`` would also rewrite every image merely read, since reading can mark
        QuPath's ImageData as changed (0.6 renames the server to the entry's name).
        """
        if self._closed:
            return
        self._closed = True
        if self.writable and self._written:
            for entry in self._written:
                entry.save()
            self._qp.save(images=False)

    def __enter__(self) -> "QuPathProjectSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_project(path: str | Path, images: Sequence[tuple[Path, Sequence[Annotation]]]) -> Path:
    """A new QuPath project at ``path`` holding ``images`` (brightfield H&E) with their annotations as
    the user's own; returns its ``project.qpproj``. Needs QuPath (:class:`PdsegError` says how to get it)."""
    pq = _Paquo()
    path = Path(path)
    try:
        with pq.QuPathProject(path, mode="x") as qp:
            classes: dict[str, Any] = {}
            for image, anns in images:
                entry = qp.add_image(Path(image).resolve(), image_type=pq.QuPathImageType.BRIGHTFIELD_H_E)
                for a in anns:
                    if a.classification and a.classification not in classes:
                        classes[a.classification] = pq.QuPathPathClass(
                            a.classification, color=tuple(a.color) if a.color else None)
                    entry.hierarchy.add_annotation(roi=a.geometry, path_class=classes.get(a.classification))
            qp.path_classes = list(classes.values())
    except Exception as e:
        raise PdsegError(f"{path}: QuPath could not create the project ({type(e).__name__}: {e})") from e
    return path / "project.qpproj"
