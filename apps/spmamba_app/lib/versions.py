"""Version history of the served model: every publish keeps the model it replaces, and any kept one can be restored.

Layout in ``<model_dir>``::

    spmamba.pt                the served (published) model
    versions/<version>.pt     one file per kept version: hard links where the file system allows (no extra space
                              for the served one), copies elsewhere and of a ``--conf model`` file
    versions/index.json       metadata of each kept version and a log of publishes and rollbacks (atomic writes)
    versions/.lock            serialises the training subprocess's publish and the server's rollback

``publish`` runs in MONAI Label's training subprocess: it moves the outgoing model(s) into the history (the
published file, and an explicit ``--conf model`` when that was the one served), renames the new model over
``spmamba.pt`` and prunes the history to ``keep_versions`` (the served version is never pruned). ``rollback`` runs
in the server: it renames a kept version over ``spmamba.pt`` with a fresh modification time, so the model store's
newest-file rule serves it at the next request and an explicit ``--conf model`` file cannot silently win.

Metadata is read with ``spmamba.checkpoint.read_checkpoint_meta`` (tensors memory-mapped, no model built) and
stored in the index, so listing never opens a model file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

from spmamba.atomic import atomic_path, write_json

try:  # POSIX: an advisory lock shared by the server and the training subprocess
    import fcntl
except ImportError:  # pragma: no cover - Windows: the thread lock only
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

VERSIONS_DIRNAME = "versions"
INDEX_FILENAME = "index.json"
LOG_LENGTH = 100

#: SP-Mamba's presets from weakest to strongest; a training of a lower rank than the served model's asks for
#: ``force``. Other methods' presets are not ranked (never compared).
PRESET_ORDER = ("tiny", "fast", "paper")
RANKED_METHOD = "spmamba"  # the method of files that name none
#: methods whose presets form the ladder PRESET_ORDER (tiny < fast < paper)
RANKED_METHODS = ("spmamba", "memmc_mae", "spatial_msma")
_SAFE_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_THREAD_LOCK = threading.Lock()

_TRAINING_KEYS = ("epochs", "total_epochs", "steps", "total_steps", "stopped_early", "n_train_volumes",
                  "n_calibration_volumes", "final_loss", "train_seconds", "device", "encoder_weights",
                  "position_normalise", "fusion", "intensity_search_mm")
_CALIBRATION_KEYS = ("pixel_threshold", "volume_threshold", "pixel_fpr", "volume_fpr", "n_volumes")


class UnknownVersion(KeyError):
    """No kept version with that id (the route answers 404)."""


def preset_rank(name: Any, method: str = RANKED_METHOD) -> Optional[int]:
    """SP-Mamba, MemMC-MAE and Spatial-MSMA: 0 tiny, 1 fast, 2 paper; None for a custom configuration or another method (never
    compared)."""
    return PRESET_ORDER.index(name) if method in RANKED_METHODS and name in PRESET_ORDER else None


def weaker_preset_message(new: Any, served: Optional[Dict[str, Any]],
                          method: str = RANKED_METHOD) -> Optional[str]:
    """A warning when a training of ``method`` with preset ``new`` would replace a served model of the same method
    and a stronger preset."""
    if not served or served.get("method", RANKED_METHOD) != method:
        return None
    old = served.get("preset")
    r_new, r_old = preset_rank(new, method), preset_rank(old, method)
    if r_new is None or r_old is None or r_new >= r_old:
        return None
    return (
        f"the training preset {new!r} is weaker than the served model's {old!r} (version {served.get('version')}; "
        f"presets from weakest: {', '.join(PRESET_ORDER)}): the new model would replace it. The served model stays "
        f"in the version history (GET /model/versions; POST /model/rollback?version={served.get('version')} "
        f"restores it)."
    )


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


def describe_meta(meta: Dict[str, Any]) -> Dict[str, Any]:
    """Version metadata from ``read_checkpoint_meta`` output (or an equivalent dict made from a Detector)."""
    config = meta.get("config") or {}
    info = meta.get("meta") or {}
    training = info.get("training") or {}
    calibration = meta.get("calibration") or {}
    return {
        "version": meta.get("version"),
        "method": meta.get("method", "spmamba"),  # files written before methods had names are SP-Mamba's
        "preset": config.get("name") if isinstance(config, dict) else None,
        "created": info.get("created"),
        "library_version": info.get("library_version"),
        "training": {k: _finite(training[k]) for k in _TRAINING_KEYS if k in training},
        "calibration": {k: _finite(calibration[k]) for k in _CALIBRATION_KEYS if k in calibration},
        "position_normalise": bool(meta.get("has_position_stats")),
    }


def read_model_info(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """Version metadata of a model file, or None when there is none or it cannot be read (never raises)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        from spmamba.checkpoint import read_checkpoint_meta

        meta = read_checkpoint_meta(path)
    except Exception as e:  # noqa: BLE001 - informational
        logger.warning(f"Cannot read the metadata of {path}: {e}")
        return None
    info = describe_meta(meta)
    if not info.get("version"):  # written by a library that did not store it: the served version, computed once
        try:
            from spmamba.detector import Detector

            info["version"] = Detector.load(path, device="cpu").version
        except Exception:  # noqa: BLE001
            return None
    return info


def served_path(published: str, explicit: Optional[str]) -> Optional[str]:
    """The file the model store serves: the newest existing of ``explicit`` and ``published`` (same rule)."""
    best, best_mtime = None, -1
    for path in (explicit, published):
        if not path:
            continue
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            continue
        if mtime > best_mtime:
            best, best_mtime = path, mtime
    return best


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class VersionHistory:
    """The kept versions of one model folder (see the module docstring)."""

    def __init__(self, model_dir: str, published: str, keep: int = 5, explicit: Optional[str] = None):
        self.model_dir = model_dir
        self.published = published
        self.keep = max(0, int(keep))
        self.explicit = explicit
        self.dir = os.path.join(model_dir, VERSIONS_DIRNAME)
        self.index_path = os.path.join(self.dir, INDEX_FILENAME)

    # ------------------------------------------------------------------ storage
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.dir, exist_ok=True)
        with _THREAD_LOCK:
            if fcntl is None:
                yield
                return
            with open(os.path.join(self.dir, ".lock"), "a") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _read(self) -> Dict[str, Any]:
        try:
            with open(self.index_path) as f:
                index = json.load(f)
        except (OSError, ValueError):
            index = {}
        if not isinstance(index, dict):
            index = {}
        index.setdefault("versions", [])
        index.setdefault("log", [])
        return index

    def _write(self, index: Dict[str, Any]) -> None:
        index["log"] = index.get("log", [])[-LOG_LENGTH:]
        write_json(self.index_path, index)

    def file_of(self, version: str) -> str:
        if not _SAFE_VERSION.match(version or ""):
            raise UnknownVersion(version)
        return os.path.join(self.dir, f"{version}.pt")

    @staticmethod
    def _find(index: Dict[str, Any], version: str) -> Optional[Dict[str, Any]]:
        for entry in index["versions"]:
            if entry.get("version") == version:
                return entry
        return None

    def _keep_file(self, path: str, info: Dict[str, Any], index: Dict[str, Any], source: str,
                   now: float, copy: bool = False) -> Optional[Dict[str, Any]]:
        """Put the model file ``path`` (described by ``info``) into the history; returns its entry. ``copy``: never
        a hard link (for files this app does not write itself, which might be overwritten in place)."""
        version = info.get("version")
        try:
            dst = self.file_of(str(version))
        except UnknownVersion:
            logger.warning(f"Not keeping {path}: unusable version id {version!r}")
            return None
        if not os.path.exists(dst):
            with atomic_path(dst, suffix=".part") as tmp:
                if copy:
                    shutil.copyfile(path, tmp)
                else:
                    _link_or_copy(path, tmp)
        entry = self._find(index, version)
        if entry is None:
            try:
                ts = os.stat(path).st_mtime
            except OSError:
                ts = now
            entry = {**info, "published_ts": ts, "published": _iso(ts), "source": source}
            index["versions"].append(entry)
        entry["file"] = os.path.relpath(dst, self.model_dir)
        entry["size_bytes"] = os.path.getsize(dst)
        entry["last_served_ts"] = now
        return entry

    def _prune(self, index: Dict[str, Any], protect: Optional[str]) -> List[str]:
        """Keep the ``keep`` most recently served versions (``protect`` always); delete the rest and stray files."""
        entries = [e for e in index["versions"] if os.path.isfile(os.path.join(self.model_dir, e.get("file", "")))]
        entries.sort(key=lambda e: (e.get("version") == protect, e.get("last_served_ts") or 0), reverse=True)
        kept, dropped = entries[: max(1, self.keep)], entries[max(1, self.keep):]
        index["versions"] = sorted(kept, key=lambda e: e.get("published_ts") or 0, reverse=True)
        names = {os.path.basename(e["file"]) for e in kept}
        for name in os.listdir(self.dir):
            if name.endswith(".pt") and name not in names:
                try:
                    os.unlink(os.path.join(self.dir, name))
                except OSError:
                    pass
        return [e["version"] for e in dropped]

    def _newer_than_explicit(self, path: str) -> None:
        """Make sure ``path`` (just renamed into place) is newer than an explicit ``--conf model`` file."""
        if not self.explicit or not os.path.exists(self.explicit):
            return
        ex = os.stat(self.explicit).st_mtime
        if os.stat(path).st_mtime <= ex:
            t = max(time.time(), ex + 1.0)
            os.utime(path, (t, t))

    # ------------------------------------------------------------------ publish (training subprocess)
    def publish(self, detector, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Save ``detector`` as the served model; keep the model(s) it replaces. Returns the new version's entry
        plus ``previous_version`` (the version served before, or None) and ``pruned`` (versions dropped)."""
        os.makedirs(self.model_dir, exist_ok=True)
        with self._locked():
            index = self._read()
            now = time.time()
            before = served_path(self.published, self.explicit)
            previous = read_model_info(before) if before else None
            if self.keep > 0:
                outgoing = [(self.published, "published")]
                if before and before == self.explicit:
                    outgoing.append((self.explicit, "conf model"))
                for path, source in outgoing:
                    info = previous if path == before else read_model_info(path)
                    if info is None:
                        continue
                    try:
                        self._keep_file(path, info, index, source, now, copy=source == "conf model")
                    except OSError as e:  # the history is a convenience: never fail the publish for it
                        logger.warning(f"Could not keep {path} in the version history: {e}")
            detector.save(self.published)  # atomic (spmamba.checkpoint): readers see the old or the new file
            self._newer_than_explicit(self.published)
            info = describe_meta({
                "version": detector.version,
                "config": {"name": getattr(detector.config, "name", None)},
                "calibration": _calibration_dict(detector),
                "meta": detector.meta,
                "has_position_stats": getattr(detector, "position_stats", None) is not None,
            })
            info["training"].update({k: v for k, v in (extra or {}).items() if v is not None})
            if not info.get("library_version"):
                from spmamba import __version__ as library_version

                info["library_version"] = library_version
            entry = dict(info)
            pruned: List[str] = []
            if self.keep > 0:
                try:
                    kept = self._keep_file(self.published, info, index, "training", now)
                    if kept is not None:
                        kept.update({**info, "published_ts": now, "published": _iso(now), "source": "training"})
                        entry = kept
                    pruned = self._prune(index, detector.version)
                except OSError as e:
                    logger.warning(f"Could not keep the new model in the version history: {e}")
            index["log"].append({"ts": _iso(now), "action": "publish", "version": detector.version,
                                 "preset": info.get("preset"),
                                 "previous": previous.get("version") if previous else None, "pruned": pruned})
            self._write(index)
        return {**entry, "previous_version": previous.get("version") if previous else None,
                "previous_preset": previous.get("preset") if previous else None, "pruned": pruned}

    # ------------------------------------------------------------------ list / rollback (server)
    def list(self, current: Optional[str] = None) -> List[Dict[str, Any]]:
        """Kept versions, newest published first; ``current`` marks the served one."""
        index = self._read()
        out = []
        for entry in index["versions"]:
            if not os.path.isfile(os.path.join(self.model_dir, entry.get("file", ""))):
                continue
            out.append({**entry, "current": entry.get("version") == current})
        out.sort(key=lambda e: e.get("published_ts") or 0, reverse=True)
        return out

    def log(self) -> List[Dict[str, Any]]:
        return list(self._read().get("log", []))

    def rollback(self, version: str, current: Optional[str] = None) -> Dict[str, Any]:
        """Serve the kept ``version`` again (rename over the published file, fresh modification time).

        Raises UnknownVersion (not kept / file gone) or ``spmamba.checkpoint.CheckpointError`` (file unreadable)."""
        src = self.file_of(version)
        with self._locked():
            index = self._read()
            entry = self._find(index, version)
            if entry is None or not os.path.isfile(src):
                raise UnknownVersion(version)
            from spmamba.checkpoint import CheckpointError, read_checkpoint_meta

            found = read_checkpoint_meta(src).get("version")  # refuse a damaged file before it replaces the model
            if found and found != version:
                raise CheckpointError(f"{src} now holds version {found}, not {version} (overwritten in place?)")
            now = time.time()
            with atomic_path(self.published, suffix=".part") as tmp:
                _link_or_copy(src, tmp)
                os.utime(tmp, (now, now))  # newest: the model store serves it from the next request on
            self._newer_than_explicit(self.published)
            entry["last_served_ts"] = now
            index["log"].append({"ts": _iso(now), "action": "rollback", "version": version, "previous": current})
            self._write(index)
            return dict(entry)


def _calibration_dict(detector) -> Dict[str, Any]:
    cal = getattr(detector, "calibration", None)
    if cal is None:
        return {}
    return {k: getattr(cal, k) for k in _CALIBRATION_KEYS if hasattr(cal, k)}
