"""Backups of the QuPath project files a write-back touches, taken before anything is changed.

A project's objects live in ``data/<entryID>/data.qpdata`` (Java serialization: only QuPath can repair it),
so pdseg copies what it is about to modify into ``<project>/pdseg/backups/<timestamp>/`` first. One backup
folder per session: the project file and class list when the folder is created, then each image's data
folder the first time that image is written.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.names import PDSEG_DIR

PROJECT_FILES = ("project.qpproj", "classifiers/classes.json")
"""Project-level files a write-back may change (the class list is rewritten when classes are added)."""


def new_backup_dir(project_dir: Path, when: datetime | None = None) -> Path:
    """Create and return an empty ``<project>/pdseg/backups/<YYYYmmdd-HHMMSS>[-n]`` folder."""
    stamp = (when or datetime.now()).strftime("%Y%m%d-%H%M%S")
    root = Path(project_dir) / PDSEG_DIR / "backups"
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


def latest_backup(project_dir: Path, entry_dir: Path) -> Path | None:
    """The newest non-empty ``data.qpdata`` of ``entry_dir`` among pdseg's backups, if any."""
    root = Path(project_dir) / PDSEG_DIR / "backups"
    found = [p for p in root.glob(f"*/data/{Path(entry_dir).name}/data.qpdata") if p.is_file() and p.stat().st_size]
    return max(found, key=lambda p: p.parent.parent.parent.name) if found else None


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
