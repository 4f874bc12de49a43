"""Small file helpers shared by the steps: checksums and atomic writes.

A file is written to a temporary sibling and renamed into place; a folder is written in place with
a completion marker written last, never renamed (unsafe on Cloud Storage FUSE: docs/steps.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

CHUNK = 8 * 1024 * 1024  # bytes read per hash update: large enough to keep disk reads sequential
COMPLETE = ".complete"  # written last into a folder by atomic_dir: a folder without it is incomplete
FILE_MODE = 0o644  # outputs are read by other users (serving containers, other service accounts)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp creates it owner-only
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was finished by :func:`atomic_dir` (its marker is there)."""
    return (Path(folder) / COMPLETE).is_file()


def clear_dir(folder: Path) -> None:
    """Remove what ``folder`` holds, keeping the folder itself (no rename, FUSE-safe)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def make_readable(folder: str | os.PathLike) -> None:
    """Files 0644 and folders 0755 at least, under ``folder``: some writers (transformers'
    safetensors shards) create files owner-only. A no-op on gcsfuse, whose modes are the mount's."""
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if path.is_symlink():
            continue
        wanted = 0o755 if path.is_dir() else FILE_MODE
        current = stat.S_IMODE(path.stat().st_mode)
        if current & wanted != wanted:
            path.chmod(current | wanted)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield ``final``, emptied, to write into; on success write its :data:`COMPLETE` marker last.

    The old marker goes first, so from then on the folder reads as incomplete (``is_complete``)
    until the new one lands; a run cut off (even by SIGKILL) leaves no marker, and the next write
    clears the stale files. On an exception the half-written folder is removed.
    """
    final = Path(final)
    with contextlib.suppress(FileNotFoundError):
        (final / COMPLETE).unlink()
    clear_dir(final)
    final.mkdir(parents=True, exist_ok=True)
    try:
        yield final
        make_readable(final)
        write_bytes_atomic(final / COMPLETE, b"")
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise


def link_or_copy(src: Path, dst: Path, hardlink: bool) -> str:
    """A hard link where allowed (inputs that are never changed), else a synced copy; either way
    ``dst`` appears whole. Returns "linked" or "copied"."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.staging")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    if hardlink:
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return "linked"
        except OSError:  # other filesystem (EXDEV), or links not allowed there: copy
            pass
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dst)
    return "copied"
