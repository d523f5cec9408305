"""A LocalDatastore that cannot be corrupted by bad input, plus the curation state of each study.

Differences from MONAI Label's ``LocalDatastore`` (0.8.5):

* the studies are the files the library reads (``spmamba.io.VOLUME_SUFFIXES``: ``.nii.gz``, ``.nii``, ``.nrrd``,
  ``.nhdr``, and 2-D ``.png``, ``.jpg``, ``.jpeg``, ``.dcm`` images, volumes with one slice) and a study's id is
  ``spmamba.io.volume_id`` of its file name;
* uploads are validated *before* they are added: the id must be a safe file name (no ``../x``), the file must be a
  readable volume or 2-D image (``spmamba.io.load_volume``: truncated, 4-D, 1-D, NaN/Inf, absurd header sizes and
  non-images are refused with a 4xx naming the problem), and it is copied into place with a temporary file + rename;
* ``datastore_v2.json`` is written atomically (temporary file + rename) and every read-modify-write reloads the file
  under the lock first, so the server and MONAI Label's training/scoring subprocesses never lose each other's updates;
* unknown ids give 404 instead of a 500; label tags are checked like ids;
* ``info["curation"]`` holds ``normal`` / ``abnormal`` / ``excluded`` (absent = unreviewed), validated on write.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from spmamba.atomic import atomic_path, write_text
from spmamba.io import SUPPORTED_FILES, VOLUME_SUFFIXES, volume_id, volume_suffix

from .configs import CURATION_KEY, CURATION_STATES
from .detection import read_volume
from .errors import check_id, not_found, unprocessable, unsupported

logger = logging.getLogger(__name__)

UNREVIEWED = ("", "none", "unreviewed", None)


def require_volume_name(filename: Optional[str]) -> str:
    """The volume suffix of an upload's file name, or a 415 naming the client's file (the one message for
    ``POST /infer`` and ``PUT /datastore/image``)."""
    ext = volume_suffix(filename or "")
    if ext is None:
        raise unsupported(
            f"unsupported file type {os.path.basename(filename or '')!r}: upload a {SUPPORTED_FILES} volume or image"
        )
    return ext


def validate_volume_file(path: str, shown_name: str) -> None:
    """Raise a 422 naming the problem unless ``path`` is a readable volume (the library decides what readable is)."""
    read_volume(path, shown_name)


def normalise_curation(value: Any) -> Optional[str]:
    """``normal``/``abnormal``/``excluded`` (any case), or None for unreviewed; anything else is a 422."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise unprocessable(f"curation must be one of {', '.join(CURATION_STATES)} (or null), not {value!r}")
    text = value.strip().lower()
    if text in UNREVIEWED:
        return None
    if text not in CURATION_STATES:
        raise unprocessable(f"curation must be one of {', '.join(CURATION_STATES)} (or null), not {value!r}")
    return text


class CuratedDatastore(LocalDatastore):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("extensions", [f"*{e}" for e in VOLUME_SUFFIXES])
        super().__init__(*args, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:
            # atomic writes (ours and the subprocesses') arrive as a rename: reload on it as on a modification
            handler.on_moved = self._on_moved_event

    # ------------------------------------------------------------------ file I/O
    def _to_id(self, file: str) -> Tuple[str, str]:
        """(id, extension) of a study or label file: the library's ``volume_id`` and the rest of the name."""
        if volume_suffix(file) is None:
            return super()._to_id(file)
        sid = volume_id(file)
        return sid, os.path.basename(file)[len(sid):]

    def _on_moved_event(self, event):
        dest = getattr(event, "dest_path", None)
        if dest == self._datastore_config_path:
            self._init_from_datastore_file()
        elif dest and volume_suffix(dest) and os.path.dirname(dest) == os.path.realpath(self._datastore.image_path()):
            self.refresh()  # a volume moved into the studies folder

    def _reload_unlocked(self) -> None:
        """Reload ``datastore_v2.json`` if another process changed it. Caller holds the lock."""
        if not os.path.exists(self._datastore_config_path):
            return
        ts = os.stat(self._datastore_config_path).st_mtime
        if ts == self._config_ts:
            return
        with open(self._datastore_config_path) as fp:
            model = LocalDatastoreModel.model_validate_json(fp.read())
        model.base_path = self._datastore_path
        self._datastore = model
        self._config_ts = ts

    def _write_unlocked(self) -> None:
        data = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
        write_text(self._datastore_config_path, data, fsync=True)
        self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _update_datastore_file(self, lock=True):  # parent hook: make every write atomic
        if lock:
            with FileLock(self._lock_file):
                self._write_unlocked()
        else:
            self._write_unlocked()

    def sync(self) -> None:
        """Pick up changes other processes made (cheap: one stat when nothing changed)."""
        try:
            if os.stat(self._datastore_config_path).st_mtime == self._config_ts:
                return
        except OSError:
            return
        with FileLock(self._lock_file):
            self._reload_unlocked()

    # ------------------------------------------------------------------ images
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        ext = require_volume_name(image_filename)
        if not image_id:
            image_id = volume_id(image_filename)
        check_id(image_id)
        info = dict(image_info or {})
        if CURATION_KEY in info:
            state = normalise_curation(info[CURATION_KEY])
            if state is None:
                info.pop(CURATION_KEY)
            else:
                info[CURATION_KEY] = state
        validate_volume_file(image_filename, f"{image_id}{ext}")

        name = image_id + ext
        with atomic_path(os.path.join(self._datastore.image_path(), name), suffix=".part") as tmp:
            shutil.copyfile(image_filename, tmp)  # copied in full before it appears under its name
        with FileLock(self._lock_file):
            self._reload_unlocked()
            old = self._datastore.objects.get(image_id)
            if old is not None and old.image.ext != ext:
                stale = os.path.join(self._datastore.image_path(), image_id + old.image.ext)
                if os.path.exists(stale):
                    os.unlink(stale)
            info["ts"] = int(time.time())
            info["name"] = name
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._write_unlocked()
        logger.info(f"Added image {image_id} ({name})")
        return image_id

    def require_image(self, image_id: str) -> None:
        """400 for an id that is not a safe name, 404 for one that is not a study."""
        check_id(image_id)
        self.sync()
        if image_id not in self._datastore.objects:
            raise not_found(f"image {image_id!r} not found in the datastore")

    def _require(self, image_id: str):
        check_id(image_id)
        self.sync()
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise not_found(f"image {image_id!r} not found in the datastore")
        return obj

    def remove_image(self, image_id: str) -> None:
        self._require(image_id)
        super().remove_image(image_id)

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        self._require(image_id)
        return super().get_image_info(image_id)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> Dict[str, Any]:
        if not isinstance(info, dict):
            raise unprocessable("image info must be a JSON object")
        check_id(image_id)
        update = dict(info)
        clear_curation = False
        if CURATION_KEY in update:
            state = normalise_curation(update[CURATION_KEY])
            if state is None:
                update.pop(CURATION_KEY)
                clear_curation = True
            else:
                update[CURATION_KEY] = state
            update["curation_ts"] = int(time.time())
        with FileLock(self._lock_file):
            self._reload_unlocked()
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise not_found(f"image {image_id!r} not found in the datastore")
            obj.image.info.update(update)
            if clear_curation:
                obj.image.info.pop(CURATION_KEY, None)
            self._write_unlocked()
            return copy.deepcopy(obj.image.info)

    # ------------------------------------------------------------------ labels
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        self._require(image_id)
        check_id(label_tag, "label tag")
        if volume_suffix(label_filename) is None:
            raise unsupported(f"unsupported label file type: upload a {SUPPORTED_FILES} label")
        validate_volume_file(label_filename, f"label for {image_id}")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._require(label_id)
        check_id(label_tag, "label tag")
        super().remove_label(label_id, label_tag)

    # ------------------------------------------------------------------ curation
    def curation(self, image_id: str) -> Optional[str]:
        obj = self._datastore.objects.get(image_id)
        return obj.image.info.get(CURATION_KEY) if obj else None

    def studies_by_state(self, state: Optional[str]) -> List[str]:
        """Ids whose curation state is ``state`` (None = unreviewed), in sorted order."""
        self.sync()
        return sorted(k for k, v in self._datastore.objects.items() if v.image.info.get(CURATION_KEY) == state)

    def training_studies(self, unflagged_normal: bool) -> List[str]:
        ids = self.studies_by_state("normal")
        if unflagged_normal:
            ids = sorted(set(ids) | set(self.studies_by_state(None)))
        return ids

    def seed_curation(self, csv_path: str) -> int:
        """Apply ``id,curation`` rows (or ``id,abnormal`` 0/1 rows) to studies that have no state yet."""
        if not csv_path or not os.path.isfile(csv_path):
            return 0
        states: Dict[str, str] = {}
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                sid = (row.get("id") or "").strip()
                state = (row.get("curation") or row.get("state") or "").strip().lower()
                if not state and row.get("abnormal") not in (None, ""):
                    state = "abnormal" if str(row["abnormal"]).strip().lower() in ("1", "true", "yes") else "normal"
                if sid and state in CURATION_STATES:
                    states[sid] = state
        changed = 0
        with FileLock(self._lock_file):
            self._reload_unlocked()
            for sid, state in states.items():
                obj = self._datastore.objects.get(sid)
                if obj is not None and CURATION_KEY not in obj.image.info:
                    obj.image.info[CURATION_KEY] = state
                    obj.image.info["curation_ts"] = int(time.time())
                    changed += 1
            if changed:
                self._write_unlocked()
        if changed:
            logger.info(f"Seeded curation state of {changed} studies from {csv_path}")
        return changed
