"""Safe file writes and checksums, shared by every module that writes user-visible files.

A write goes to a temp file beside the target, is flushed to disk, and is renamed over it: a reader (or a
crash) sees the old file or the new one, never half of one. New files get ordinary permissions
(0666 minus the umask), not ``mkstemp``'s private 0600; a replaced file keeps its mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from pdseg_qupath.core.errors import PdsegError


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _tmp_prefix(path: Path) -> str:
    """A temp name beside ``path`` that fits wherever ``path`` fits (long names are shortened)."""
    return "." + path.name.encode("utf-8")[:180].decode("utf-8", "ignore") + "."


def atomic_write_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write(tmp)`` fill a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = _mode_for(path)
        fd, name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise PdsegError(f"{path}: cannot write here ({e.strerror or e}); check the folder is writable") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise PdsegError(f"{path}: cannot write ({e.strerror or e}); the old file is unchanged") from None
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` (``\\n`` line ends) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """Atomic, pretty JSON (NaN-free: undefined scores are ``null``)."""
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Let ``fill(tmp)`` fill a temp folder beside ``path``, then move it into place.

    An existing folder at ``path`` is renamed aside first and deleted only once the new one is in place,
    so a crash leaves the old folder, the new one, or the old one beside an unused temp folder.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    except OSError as e:
        raise PdsegError(f"{path}: cannot write here ({e.strerror or e}); check the folder is writable") from None
    try:
        fill(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise PdsegError(f"{path}: cannot write ({e.strerror or e})") from None
        raise
    return path


def writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create folder ``path`` if needed and prove it writable (a probe file), before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".pdseg-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PdsegError(f"{path}: cannot write here ({e.strerror or e}); choose a writable {flag} folder") from None
    return path


def refuse_symlink(path: str | Path, what: str = "") -> Path:
    """``path``, unless it is a symbolic link: pdseg never writes or deletes through a link it did not create."""
    path = Path(path)
    if path.is_symlink():
        raise PdsegError(f"{path}: is a symbolic link{f' ({what})' if what else ''}; pdseg never writes or deletes "
                         "through links it did not create. Remove the link, or choose another --out")
    return path


def open_no_follow(path: str | Path) -> int:
    """A file descriptor for ``path`` (created if missing, never truncated), refusing a symbolic link."""
    path = refuse_symlink(path)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise PdsegError(f"{path}: cannot open ({e.strerror or e}); check the folder is writable and that "
                         "the file is not a symbolic link") from None


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` atomically; a symbolic link at ``dst`` is replaced, never written through."""
    return atomic_write_with(dst, lambda tmp: shutil.copy2(src, tmp))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
