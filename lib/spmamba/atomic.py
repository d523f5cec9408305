"""Atomic file writes: a reader (another process, a crash, a Ctrl-C) sees the old file or the new one, never part of
one. Every file the library and the app write in place (models, heatmaps, JSON records, the datastore) goes through
here: the data is written to a temporary name in the target's own folder (so the rename stays on one file system),
then renamed over the target with ``os.replace``.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np

__all__ = ["atomic_path", "write_bytes", "write_text", "write_json", "json_default"]

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp", fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (not created yet; hidden, ending in ``suffix`` so writers that go by
    the extension, such as nibabel, pick the right format). When the block ends without an exception the
    temporary file is renamed over ``path`` (after ``fsync`` when asked); otherwise it is removed and ``path`` is
    untouched. The target's folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        # also when the rename was a no-op: rename(2) leaves both names when they are links to one file
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_bytes(path: PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays as Python numbers and lists, anything else as ``str``."""
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    return str(obj)


def write_json(path: PathLike, data: Any, fsync: bool = False, indent: int = 2) -> Path:
    """Write ``data`` as JSON (indented, numpy values as numbers, other odd values as strings) atomically."""
    return write_text(path, json.dumps(data, indent=indent, default=json_default) + "\n", fsync=fsync)
