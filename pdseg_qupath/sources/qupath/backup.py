"""Backups of the QuPath project files a write-back touches, taken before anything is changed.

A project's objects live in ``data/<entryID>/data.qpdata`` (Java serialization: only QuPath can repair it),
so pdseg copies what it is about to modify into ``<project>/pdseg/backups/<timestamp>/`` first. One backup
folder per session: the project file and class list when the folder is created, then each image's data
folder the first time that image is written. After a session whose write-backs all succeeded,
:func:`prune_backups` deletes older folders pdseg made, keeping the newest few and, for every image, the
newest folder that holds its data (the one :func:`latest_backup` names).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.names import PDSEG_DIR

PROJECT_FILES = ("project.qpproj", "classifiers/classes.json")
"""Project-level files a write-back may change (the class list is rewritten when classes are added)."""

STAMP_FORMAT = "%Y%m%d-%H%M%S"
_FOLDER_NAME = re.compile(r"(\d{8}-\d{6})(?:-(\d+))?")
"""The name :func:`new_backup_dir` gives a folder: ``YYYYmmdd-HHMMSS``, then ``-2``, ``-3``… within one second."""


def backups_root(project_dir: Path) -> Path:
    """``<project>/pdseg/backups``: one folder per write-back session."""
    return Path(project_dir) / PDSEG_DIR / "backups"


def new_backup_dir(project_dir: Path, when: datetime | None = None) -> Path:
    """Create and return an empty ``<project>/pdseg/backups/<YYYYmmdd-HHMMSS>[-n]`` folder."""
    stamp = (when or datetime.now()).strftime(STAMP_FORMAT)
    root = backups_root(project_dir)
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise PdsegError(f"{root}: could not create a new backup folder (1000 exist for {stamp})")


class ProjectBackup:
    """Copies project files into one backup folder, each at most once per session."""

    def __init__(self, project_dir: Path) -> None:
        self.project_dir = Path(project_dir)
        self.folder: Path | None = None
        self._copied: set[str] = set()

    def ensure(self, entry_dir: Path | None = None) -> Path:
        """Back up the project files (first call) and ``entry_dir`` (first time seen); return the folder.

        Raises :class:`PdsegError` if a copy fails, so that the caller writes nothing.
        """
        try:
            if self.folder is None:
                folder = new_backup_dir(self.project_dir)
                for rel in PROJECT_FILES:
                    self._copy(self.project_dir / rel, folder / rel)
                self.folder = folder
            if entry_dir is not None:
                entry_dir = Path(entry_dir)
                key = str(entry_dir.resolve())
                if key not in self._copied:
                    try:
                        rel_entry = entry_dir.resolve().relative_to(self.project_dir.resolve())
                    except ValueError:
                        rel_entry = Path("data") / entry_dir.name
                    self._copy(entry_dir, self.folder / rel_entry)
                    self._copied.add(key)
        except OSError as e:
            raise PdsegError(
                f"{self.project_dir}: could not back up the project before writing ({e}); nothing was written. "
                "Check free disk space and write permission on the project folder."
            ) from e
        return self.folder

    @staticmethod
    def _copy(src: Path, dst: Path) -> None:
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        # absent (an image never saved, a project without classes.json): nothing to protect


def _order(name: str) -> tuple[str, int] | None:
    """Sort key of a folder name :func:`new_backup_dir` gives (time, then ``-n``); None for any other name."""
    m = _FOLDER_NAME.fullmatch(name)
    if m is None:
        return None
    try:
        datetime.strptime(m.group(1), STAMP_FORMAT)
    except ValueError:
        return None
    return m.group(1), int(m.group(2) or 1)


def backup_folders(project_dir: Path) -> list[Path]:
    """pdseg's backup folders, oldest first: real folders (not links) named as :func:`new_backup_dir` names them."""
    try:
        children = list(backups_root(project_dir).iterdir())
    except OSError:
        return []
    keyed = [(key, p) for p in children if (key := _order(p.name)) and p.is_dir() and not p.is_symlink()]
    return [p for _, p in sorted(keyed)]


def _held_data(folder: Path, entry: str) -> Path | None:
    """The non-empty ``data.qpdata`` of image ``entry`` in one backup folder, if it holds one."""
    qpdata = folder / "data" / entry / "data.qpdata"
    try:
        return qpdata if qpdata.is_file() and qpdata.stat().st_size else None
    except OSError:
        return None


def latest_backup(project_dir: Path, entry_dir: Path) -> Path | None:
    """The newest non-empty ``data.qpdata`` of ``entry_dir`` among pdseg's backups, if any."""
    for folder in reversed(backup_folders(project_dir)):
        found = _held_data(folder, Path(entry_dir).name)
        if found is not None:
            return found
    return None


@dataclass
class PruneReport:
    """What :func:`prune_backups` did: folders deleted (names), folders left, and deletions that failed."""

    removed: list[str] = field(default_factory=list)
    kept: int = 0
    failed: list[str] = field(default_factory=list)

    def message(self, keep: int) -> str | None:
        """One line for the user, or None when nothing was deleted."""
        if not self.removed:
            return None
        span = self.removed[0] if len(self.removed) == 1 else f"{self.removed[0]} … {self.removed[-1]}"
        return (f"pdseg/backups: deleted {len(self.removed)} older backup folder(s) ({span}); kept {self.kept}: "
                f"the newest {keep} and the newest one holding each image (--keep-backups 0 keeps all)")


def prune_backups(project_dir: Path, keep: int, current: Path | None) -> PruneReport:
    """Delete older folders of pdseg's backups; never raises.

    Kept: the newest ``keep`` folders (``keep`` 0: all), ``current`` (this session's), and for every image
    the newest folder that holds its non-empty ``data.qpdata``, so :func:`latest_backup` names the same file
    after pruning as before, also for an image last written many sessions ago. Only folders named as
    :func:`new_backup_dir` names them are candidates; anything else under ``pdseg/`` is never touched.
    A folder that cannot be deleted is reported in ``failed``; nothing is deleted through a link.
    """
    try:
        return _prune(project_dir, keep, current)
    except OSError as e:  # a listing or a stat that failed: keep everything, say so
        return PruneReport(failed=[f"{backups_root(project_dir)}: old backups were not deleted ({e})"])


def _prune(project_dir: Path, keep: int, current: Path | None) -> PruneReport:
    folders = backup_folders(project_dir)
    report = PruneReport(kept=len(folders))
    if keep <= 0 or len(folders) <= keep:
        return report
    root = backups_root(project_dir)
    if root.is_symlink() or root.parent.is_symlink():
        report.failed.append(f"{root}: a symbolic link (pdseg did not make it); old backups were not deleted")
        return report
    kept = {f.name for f in folders[-keep:]}  # all in one folder: a name is a folder
    if current is not None:
        kept.add(Path(current).name)
    newest_with: dict[str, str] = {}
    for folder in folders:  # oldest first: a later folder replaces an earlier one
        try:
            entries = [p.name for p in (folder / "data").iterdir()]
        except OSError:
            continue
        for entry in entries:
            if _held_data(folder, entry) is not None:
                newest_with[entry] = folder.name
    kept.update(newest_with.values())
    for folder in folders:
        if folder.name in kept:
            continue
        try:
            shutil.rmtree(folder)
            report.removed.append(folder.name)
        except OSError as e:
            report.failed.append(f"{folder}: could not delete this old backup ({e}); delete it by hand if not needed")
    report.kept = len(folders) - len(report.removed)
    return report


def unreadable_data_message(project_dir: Path, entry_dir: Path, image: str, why: str) -> str:
    """What to say when an image's ``data.qpdata`` cannot be read: the file, pdseg's backup, how to restore."""
    qpdata = Path(entry_dir) / "data.qpdata"
    state = "missing" if not qpdata.exists() else f"{qpdata.stat().st_size} bytes"
    backup = latest_backup(project_dir, entry_dir)
    if backup is None:
        how = "pdseg holds no backup of it; QuPath may have kept data.qpdata.bkp beside it"
    else:
        how = (f"pdseg's backup is {backup}: close QuPath, then copy it over {qpdata} "
               "(QuPath may also have kept data.qpdata.bkp beside it)")
    return f"{qpdata}: the objects of image {image!r} cannot be read ({state}; {why}); {how}"


def qpdata_is_damaged(entry_dir: Path | None) -> bool:
    """Whether an image's saved objects exist but are an empty (0-byte) file, as a killed write leaves them."""
    if entry_dir is None:
        return False
    qpdata = Path(entry_dir) / "data.qpdata"
    return qpdata.is_file() and qpdata.stat().st_size == 0
