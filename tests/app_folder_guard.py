"""What the test suite must never change: the repository's MONAI Label app folder (``apps/spmamba_app``).

MONAI Label writes into the folder of the app it runs (``logs/`` from ``start_server``, ``model/`` as the default
``model_dir``), and a model left in ``apps/spmamba_app/model`` would then be served by ``spmamba serve``. Tests use a
copy of the app or point ``model_dir`` and the log into ``tmp_path``; tests/conftest.py compares a snapshot of the
folder at the start and at the end of the session and fails the run if it changed.

Left out of the snapshot: folders themselves (``start_server`` always creates empty ``model/``, ``logs/`` and
``bin/`` in the app folder it is given, which is harmless; a file in them is seen), ``__pycache__`` (Python writes
bytecode whenever it imports the app) and the content of ``.py`` files (so that someone editing the app while the
suite runs is not taken for a test writing into it; a new or removed ``.py`` file is still seen).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "spmamba_app"


def snapshot(root: Path = APP_DIR) -> Dict[str, str]:
    """relative path -> 'py' or the sha256 of the file's content, for every file under ``root``."""
    out: Dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel_dir = Path(dirpath).relative_to(root)
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if f.endswith((".pyc", ".pyo")):
                continue
            if f.endswith(".py"):
                out[str(rel_dir / f)] = "py"
                continue
            try:
                out[str(rel_dir / f)] = hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError as e:  # vanished or unreadable while walking: still a change worth reporting
                out[str(rel_dir / f)] = f"unreadable: {e}"
    return out


def changes(before: Dict[str, str], after: Dict[str, str]) -> List[str]:
    """Human-readable differences: 'added X', 'removed X', 'changed X'."""
    lines = [f"added {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    lines += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return lines


def app_copy(dest: Path) -> Path:
    """A copy of the app's code at ``dest`` (without runtime state: model/, logs/, bin/, bytecode) for a test that
    runs ``start_server`` on it, so MONAI Label writes into the copy."""
    import shutil

    shutil.copytree(APP_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "model", "logs", "bin", "*.pt"))
    return dest
