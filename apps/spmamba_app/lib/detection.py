"""One detection for a request, shared by the inference tasks, scoring and active learning.

Reads with ``spmamba.io.load_volume`` (every failure becomes a 422 naming the client's file), detects with the
served ``Detector`` (at most ``infer_workers`` at once) and summarises with ``spmamba.scoring.find_regions``.
Detection always follows the served model: its slice axis and alignment are the ones it was trained with.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
from spmamba import cpu
from spmamba.io import VolumeError, load_volume
from spmamba.scoring import find_regions

from .configs import AppSettings
from .errors import bad_request, unprocessable
from .model_store import ModelStore


def rounded(x: Any, nd: int = 6) -> Any:
    """``x`` with floats rounded to ``nd`` digits and numpy values made plain (for the JSON answers)."""
    if isinstance(x, (list, tuple)):
        return [rounded(v, nd) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v, nd) for k, v in x.items()}
    if isinstance(x, (np.floating, float)):
        return round(float(x), nd)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.ndarray):
        return rounded(x.tolist(), nd)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def read_volume(path: str, shown_name: str):
    """``spmamba.io.load_volume`` with every failure turned into a 422 that names ``shown_name``."""
    def named(msg: str) -> str:
        msg = msg.replace(path, shown_name).replace(os.path.basename(path), shown_name)
        return msg if shown_name in msg else f"{shown_name}: {msg}"

    try:
        return load_volume(path)
    except VolumeError as e:
        raise unprocessable(named(str(e))) from e
    except MemoryError as e:
        raise unprocessable(named("the volume is too large to load")) from e
    except Exception as e:  # noqa: BLE001 - any reader failure on user input is the input's fault
        raise unprocessable(named(f"not a readable volume ({type(e).__name__}: {e})")) from e


class Detection:
    """Runs one detection for a request; shared by both inference tasks and by the scoring/active-learning code."""

    def __init__(self, settings: AppSettings, store: ModelStore):
        self.settings = settings
        self.store = store
        self.datastore = None  # the app's datastore (set by the app): PACS results are stored through it
        self._slots = threading.BoundedSemaphore(max(1, settings.infer_workers))

    def read(self, image: Any, shown_name: Optional[str] = None):
        if not isinstance(image, str) or not image:
            raise bad_request("no image: give ?image=ID of a datastore study or upload a file")
        if not os.path.isfile(image):
            raise bad_request(f"image {os.path.basename(image)!r} cannot be read")
        return read_volume(image, shown_name or os.path.basename(image))

    def run(self, image: Any, shown_name: Optional[str] = None,
            foreground: bool = True) -> Tuple[Any, Any, Any, Dict[str, float]]:
        """Read + detect. Returns ``(volume, result, detector, latencies)``.

        ``foreground`` (a detection someone waits for: the inference tasks): hold a marker in the settings'
        ``foreground_dir`` while waiting for a slot and detecting, so a training running beside pauses between
        its steps and leaves the cores to this detection (``spmamba.cpu``). Scoring passes False: it is
        background work itself."""
        t0 = time.perf_counter()
        detector = self.store.get()  # 409 "train first" before reading anything
        volume = self.read(image, shown_name)
        t1 = time.perf_counter()
        name = shown_name or os.path.basename(str(image))
        marker = cpu.foreground(self.settings.foreground_dir) if foreground else contextlib.nullcontext()
        with marker, self._slots:
            t_wait = time.perf_counter()
            try:
                result = detector.detect(volume.array, affine=volume.affine, name=name)
            except VolumeError as e:  # e.g. the study cannot be aligned to the model's reference
                raise unprocessable(str(e)) from e
        t2 = time.perf_counter()
        return volume, result, detector, {"read": t1 - t0, "queue": t_wait - t1, "model": t2 - t_wait}

    def summary(self, volume: Any, result: Any, detector: Any) -> Tuple[Dict[str, Any], float]:
        t0 = time.perf_counter()
        regions = find_regions(result.heatmap, result.pixel_threshold, volume.affine)
        top = regions[: self.settings.top_regions] if self.settings.top_regions else []
        out = {
            "model_version": detector.version,
            "method": detector.method_name,
            "preset": detector.config.name,
            "score": float(result.score),
            "threshold": float(result.threshold),
            "pixel_threshold": float(result.pixel_threshold),
            "abnormal": bool(result.abnormal),
            "verdict": "abnormal" if result.abnormal else "normal",
            "slice_axis": int(result.slice_axis),
            "slice_scores": [[int(i), float(s)] for i, s in result.slice_scores],
            "regions": rounded(top),
            "n_regions": len(regions),
            "shape": [int(s) for s in volume.array.shape],
            "spacing_mm": rounded(list(volume.spacing), 4),
            "detector_timings": rounded(dict(result.timings), 4),
            # models with alignment: how the study was registered to the model's reference (else None)
            "alignment": rounded(result.alignment, 4) if result.alignment else None,
        }
        return out, time.perf_counter() - t0
