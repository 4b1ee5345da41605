"""A QuPath project (``.qpproj``) as an :class:`~pdseg_qupath.sources.base.AnnotationSource`, through paquo 0.9.

paquo starts QuPath's JVM when imported, so it is imported here lazily, in the constructor: the rest of
pdseg works without QuPath. Every paquo call below was checked against paquo 0.9's source and a real
QuPath 0.6 core; the traps it handles are marked ``paquo trap``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import shapely

from pdseg_qupath.core.annotations import (
    FINGERPRINT,
    RGB,
    UNTOUCHED,
    Annotation,
    ReadReport,
    default_color,
    fingerprint,
    is_pdseg_name,
    label_role,
    prediction_name,
)
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import write_json
from pdseg_qupath.core.geometry import clean_geometry
from pdseg_qupath.core.names import PDSEG_DIR
from pdseg_qupath.sources.base import ImageRecord, WriteReport
from pdseg_qupath.sources.qupath.backup import (
    ProjectBackup,
    PruneReport,
    prune_backups,
    qpdata_is_damaged,
    unreadable_data_message,
)
from pdseg_qupath.sources.qupath.qpproj import (
    missing_classes,
    mpp_from_builder,
    mpp_from_pair,
    path_from_file_uri,
    project_file,
    read_saved_classes,
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
            from paquo.pathobjects import QuPathPathAnnotationObject, QuPathPathDetectionObject
            from paquo.projects import QuPathProject
        except Exception as e:  # paquo raises ValueError/OSError/RuntimeError when QuPath is not found
            raise PdsegError(f"QuPath not available ({type(e).__name__}: {e}). {NO_QUPATH_HELP}") from e
        self.QuPathProject = QuPathProject
        self.QuPathPathClass = QuPathPathClass
        self.QuPathPathObjectHierarchy = QuPathPathObjectHierarchy
        self.QuPathPathAnnotationObject = QuPathPathAnnotationObject
        self.QuPathPathDetectionObject = QuPathPathDetectionObject
        self.QuPathImageType = QuPathImageType
        try:  # QuPath's own geometry classes: read ROIs as JTS geometries, build them with QuPath's factory
            from paquo.java import GeometryTools, JClass, PathObjects, WKBReader, WKBWriter

            ImagePlane = JClass("qupath.lib.regions.ImagePlane")  # noqa: N806 - a Java class
        except Exception:  # noqa: BLE001 - an older paquo: fall back to its .roi conversion
            GeometryTools = ImagePlane = PathObjects = WKBReader = WKBWriter = None  # noqa: N806
        self.GeometryTools, self.ImagePlane, self.PathObjects = GeometryTools, ImagePlane, PathObjects
        self.WKBReader, self.WKBWriter = WKBReader, WKBWriter

    def geometry(self, obj: Any) -> Any:
        """An object's ROI as shapely, through ``getROI().getGeometry()`` (QuPath's own JTS geometry).

        paquo's ``.roi`` goes through ``GeometryTools.roiToGeometry``; on a JVM other than QuPath's bundled
        Java 21 that path turned a valid 95-hole polygon into an invalid MultiPolygon of half its area.
        """
        if self.WKBWriter is None:
            return obj.roi
        jts = obj.java_object.getROI().getGeometry()
        return shapely.from_wkb(bytes(self.WKBWriter(2).write(jts)))

    def new_object(self, geom: Any, path_class: Any, detection: bool = False) -> Any:
        """A new annotation (or detection) whose ROI is built with QuPath's default geometry factory (its
        0.01-px precision model, so QuPath logs no precision warnings) on the default image plane."""
        kind = self.QuPathPathDetectionObject if detection else self.QuPathPathAnnotationObject
        if self.PathObjects is None:
            return kind.from_shapely(geom, path_class)
        jts = self.WKBReader(self.GeometryTools.getDefaultFactory()).read(shapely.to_wkb(geom))
        roi = self.GeometryTools.geometryToROI(jts, self.ImagePlane.getDefaultPlane())
        java_class = path_class.java_object if path_class is not None else None
        create = self.PathObjects.createDetectionObject if detection else self.PathObjects.createAnnotationObject
        return kind(create(roi, java_class))


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


def _class_id(obj: Any) -> str | None:
    pc = obj.path_class
    return pc.id if pc is not None else None


def _data_stamp(entry: Any) -> tuple[int, int] | None:
    """(mtime in ns, size) of the image's data file, to notice a save by someone else."""
    try:
        st = (Path(entry.entry_path) / "data.qpdata").stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return None


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
                raw = self._pq.geometry(obj)
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
        wiped = self._wiped(entry, any(a.is_pdseg or FINGERPRINT in a.measurements for a in out))
        if wiped:
            report.messages.insert(0, wiped)
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
        """Replace the image's untouched pdseg objects with ``annotations``, on a copy read just now.

        The image's data file is read again right before writing, so that anything saved since pdseg
        started (a pathologist's edit in QuPath, another pdseg run) is kept: only untouched pdseg
        predictions are replaced; user objects, and predictions the user corrected, stay. If the file
        changes again while the merge is being made, the merge is redone on the newer copy; after three
        such changes the image is refused, with nothing written.
        """
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
        for _attempt in range(3):
            before = _data_stamp(entry)
            image_data = self._fresh_image_data(entry, image)
            merged = self._merge(image, image_data, annotations, classes)
            if _data_stamp(entry) != before:
                continue  # saved by someone else while merging: merge again on their copy
            self._save(entry, image_data, changed=bool(merged.added or merged.removed))
            merged.backup, merged.target = report.backup, self.path
            self._record_write(entry, image, [a for a in annotations if a.object_type != "detection"])
            return merged
        raise PdsegError(
            f"{image.name}: its data file ({entry.entry_path / 'data.qpdata'}) kept changing while pdseg was "
            "writing (QuPath saving it?); nothing was written for this image. Close the image in QuPath and run "
            "predict again."
        )

    def _fresh_image_data(self, entry: Any, image: ImageRecord) -> Any:
        """The image's data as saved on disk now (not the copy read when pdseg started)."""
        try:
            return entry.java_object.readImageData()
        except Exception as e:
            raise PdsegError(
                f"{image.name}: could not read its objects again before writing ({type(e).__name__}: {e}); "
                "nothing was written for this image. Check that it opens in QuPath, then run predict again."
            ) from e

    def _merge(self, image: ImageRecord, image_data: Any, annotations: Sequence[Annotation],
               classes: dict[str, Any]) -> WriteReport:
        report = WriteReport(image=image.name)
        hierarchy = self._pq.QuPathPathObjectHierarchy(image_data.getHierarchy(), readonly=False,
                                                       image_name=image.name)
        with hierarchy.no_autoflush():  # one hierarchy event for the whole batch, not one per object
            objects = list(hierarchy.annotations)
            wiped = self._wiped(self._entry(image), any(is_pdseg_name(o.name) or FINGERPRINT in _measurements(o)
                                                        for o in objects))
            if wiped:
                report.messages.append(wiped)
            old = [obj for obj in objects if is_pdseg_name(obj.name) and self._untouched(obj)]
            report.kept = len(objects) - len(old)
            corrected = sum(1 for obj in objects if is_pdseg_name(obj.name)) - len(old)
            if corrected:
                report.messages.append(f"{image.name}: {corrected} prediction(s) you corrected were kept as labels")
            for obj in old:
                hierarchy.annotations.discard(obj)  # keeps any children (keepChildren=True in paquo)
            maps = [obj for obj in hierarchy.detections if is_pdseg_name(obj.name)]  # the uncertainty map
            for obj in maps:
                hierarchy.detections.discard(obj)
            report.removed = len(old) + len(maps)
            for a in annotations:
                obj = self._new_object(image, a, classes, report)
                if obj is not None:
                    (hierarchy.detections if a.object_type == "detection" else hierarchy.annotations).add(obj)
                    report.added += 1
        return report

    def _untouched(self, obj: Any) -> bool:
        """A pdseg object as pdseg wrote it (replaceable), not one the user corrected (a label now)."""
        try:
            geom, _ = clean_geometry(self._pq.geometry(obj))
        except Exception:  # noqa: BLE001 - an unreadable ROI: leave the object alone
            return False
        if geom is None:
            return True
        return label_role(Annotation(geom, _class_id(obj), name=obj.name, measurements=_measurements(obj))) == UNTOUCHED

    def _new_object(self, image: ImageRecord, a: Annotation, classes: dict[str, Any], report: WriteReport) -> Any:
        geom, what = clean_geometry(a.geometry)
        if geom is None:
            report.messages.append(f"{image.name}: a {a.classification} prediction was skipped ({what})")
            return None
        detection = a.object_type == "detection"
        obj = self._pq.new_object(geom, classes.get(a.classification) if a.classification else None, detection)
        measurements, bad = {}, []
        for k, v in a.measurements.items():
            try:
                measurements[str(k)] = float(v)  # paquo trap: an int measurement raises TypeError
            except (TypeError, ValueError):
                bad.append(str(k))
        if bad:
            report.messages.append(f"{image.name}: non-numeric measurements dropped: {bad}")
        if not detection:
            try:  # fingerprint the outline as QuPath stores it, so that a later read can tell an edit
                stored = self._pq.geometry(obj)
            except Exception:  # noqa: BLE001
                stored = geom
            measurements.update(fingerprint(stored, a.classification))
        obj.measurements.update(measurements)
        obj.name = prediction_name(a)
        return obj

    # ------------------------------------------------------------------ what pdseg wrote, and whether it lasted

    def _writes_file(self) -> Path:
        return self.project_dir / PDSEG_DIR / "writes.json"

    def _writes(self) -> dict[str, Any]:
        try:
            data = json.loads(self._writes_file().read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _record_write(self, entry: Any, image: ImageRecord, annotations: Sequence[Annotation]) -> None:
        """Remember the last write to each image (model, object count, time), to notice a later wipe."""
        models = sorted({a.metadata.get("pdseg_model", "") for a in annotations} - {""})
        writes = self._writes()
        writes[str(entry.entry_id)] = {"image": image.name, "model": models[0] if models else None,
                                       "objects": len(annotations), "written": datetime.now(timezone.utc).isoformat()}
        try:
            write_json(self._writes_file(), writes)
        except OSError:
            pass  # only the wipe check depends on it

    def _wiped(self, entry: Any, ours_present: bool) -> str | None:
        """A warning when the objects pdseg last wrote to this image are all gone (QuPath saved over them)."""
        last = self._writes().get(str(entry.entry_id))
        if ours_present or not isinstance(last, dict) or not last.get("objects"):
            return None
        model = f" by model {str(last.get('model'))[:8]}" if last.get("model") else ""
        return (f"{last.get('image', entry.image_name)}: the {last['objects']} pdseg object(s) written{model} at "
                f"{last.get('written', '?')} are gone. Most likely QuPath still had this image open and saved its "
                "older copy over them; close the image in QuPath before running pdseg, and run predict again "
                "(the backups are in pdseg/backups/). If you deleted them yourself, ignore this.")

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
        QuPath writes ``classifiers/classes.json`` as soon as the list is set, so nothing else needs saving.
        """
        colors: dict[str, RGB] = {}
        for a in annotations:
            if a.classification:
                colors.setdefault(a.classification, a.color or default_color(a.classification))
        existing = list(self._qp.path_classes)
        by_name = {pc.id: pc for pc in existing}
        # QuPath rewrites classes.json from the list it is given: keep classes saved since pdseg opened the project
        saved = read_saved_classes(self.project_dir)
        added = [self._path_class(name, saved[name]) for name in missing_classes(by_name, saved)]
        by_name.update({pc.id: pc for pc in added})
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

    def _save(self, entry: Any, image_data: Any, changed: bool) -> None:
        try:
            if changed:
                if not bool(image_data.isChanged()):
                    # a hierarchy detached from the image data: saving would drop the edits
                    raise RuntimeError("QuPath did not register the changes to this image's objects")
                entry.java_object.saveImageData(image_data)
        except Exception as e:
            raise PdsegError(
                f"{self.path}: saving failed ({type(e).__name__}: {e}). The files as they were before this "
                f"session are in {self._backup.folder}."
            ) from e

    def prune_backups(self, keep: int) -> PruneReport:
        """After a session whose write-backs all succeeded: delete older backup folders, keeping the newest
        ``keep`` (0: all), this session's, and the newest one holding each image (:func:`.backup.prune_backups`).
        Nothing is deleted when this session wrote nothing. Never raises."""
        if self._backup.folder is None:
            return PruneReport()
        return prune_backups(self.project_dir, keep, self._backup.folder)

    def close(self) -> None:
        """Release the project. Nothing is left to save, and ``project.qpproj`` is never rewritten.

        Each image was saved when written, from a copy read just before; the copies paquo read at the start
        are never saved (they would undo edits made since), and the class list was saved when it grew.
        ``QuPathProject.save()`` is not used: its ``syncChanges`` rewrites ``project.qpproj`` from the image
        list read at the start, which would drop an image (or a rename) QuPath saved while pdseg ran, and
        with ``images=True`` it would also rewrite every image merely read. pdseg changes no project entry.
        """

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
