"""Inference tasks: ``spmamba`` (float32 heatmap + scores JSON) and ``spmamba_seg`` (thresholded regions as a label);
with ``--conf method NAME`` they are named ``NAME`` and ``NAME_seg`` and serve that method's model (the JSON's
``method`` says which).

Both call ``spmamba`` only: read with ``spmamba.volume.load_volume`` (which refuses bad input with a message naming
the problem), detect with the served ``Detector``, find regions with ``spmamba.scoring.find_regions`` and write the
heatmap with ``spmamba.volume.save_volume`` (nibabel/pynrrd; MONAI Label's ITK writer is slow and its ``Restored``
transform needs torchvision, so neither is used).
"""
from __future__ import annotations

import inspect
import logging
import os
import tempfile
import threading
import time
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ..configs import AppSettings
from ..errors import bad_request, unprocessable
from ..model_store import ModelStore

logger = logging.getLogger(__name__)

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def _result_extension(request: Dict[str, Any]) -> str:
    ext = request.get("result_extension") or ".nii.gz"
    ext = str(ext).strip().lower()
    ext = ext if ext.startswith(".") else "." + ext
    if ext not in RESULT_EXTENSIONS:
        raise bad_request(f"result_extension {ext!r} is not supported: use one of {', '.join(RESULT_EXTENSIONS)}")
    return ext


def _round(x: Any, nd: int = 6) -> Any:
    if isinstance(x, (list, tuple)):
        return [_round(v, nd) for v in x]
    if isinstance(x, dict):
        return {k: _round(v, nd) for k, v in x.items()}
    if isinstance(x, (np.floating, float)):
        return round(float(x), nd)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.ndarray):
        return _round(x.tolist(), nd)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def read_volume(path: str, shown_name: str):
    """``spmamba.volume.load_volume`` with every failure turned into a 422 that names ``shown_name``."""
    from spmamba.volume import VolumeError, load_volume

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
    """Runs one detection for a request; shared by both tasks and by the scoring/active-learning code."""

    def __init__(self, settings: AppSettings, store: ModelStore):
        self.settings = settings
        self.store = store
        self._slots = threading.BoundedSemaphore(max(1, settings.infer_workers))
        self._detect_kwargs: Optional[set] = None

    def _kwargs(self, detector: Any) -> Dict[str, Any]:
        if self._detect_kwargs is None:
            try:
                self._detect_kwargs = set(inspect.signature(detector.detect).parameters)
            except (TypeError, ValueError):
                self._detect_kwargs = set()
        kw: Dict[str, Any] = {}
        if self.settings.slice_axis is not None and "slice_axis" in self._detect_kwargs:
            kw["slice_axis"] = self.settings.slice_axis
        return kw

    def read(self, image: Any, shown_name: Optional[str] = None):
        if not isinstance(image, str) or not image:
            raise bad_request("no image: give ?image=ID of a datastore study or upload a file")
        if not os.path.isfile(image):
            raise bad_request(f"image {os.path.basename(image)!r} cannot be read")
        return read_volume(image, shown_name or os.path.basename(image))

    def run(self, image: Any, shown_name: Optional[str] = None) -> Tuple[Any, Any, Any, Dict[str, float]]:
        """Read + detect. Returns ``(volume, result, detector, latencies)``."""
        t0 = time.perf_counter()
        detector = self.store.get()  # 409 "train first" before reading anything
        volume = self.read(image, shown_name)
        t1 = time.perf_counter()
        from spmamba.volume import VolumeError

        name = shown_name or os.path.basename(str(image))
        with self._slots:
            t_wait = time.perf_counter()
            try:
                result = detector.detect(volume.array, affine=volume.affine, name=name, **self._kwargs(detector))
            except VolumeError as e:  # e.g. the study cannot be aligned to the model's reference
                raise unprocessable(str(e)) from e
        t2 = time.perf_counter()
        return volume, result, detector, {"read": t1 - t0, "queue": t_wait - t1, "model": t2 - t_wait}

    def summary(self, volume: Any, result: Any, detector: Any) -> Tuple[Dict[str, Any], float]:
        from spmamba.scoring import find_regions

        t0 = time.perf_counter()
        regions = find_regions(result.heatmap, result.pixel_threshold, volume.affine)
        top = regions[: self.settings.top_regions] if self.settings.top_regions else []
        cfg = getattr(detector, "config", None)
        zooms = np.sqrt((np.asarray(volume.affine)[:3, :3] ** 2).sum(axis=0))
        out = {
            "model_version": detector.version,
            "method": getattr(detector, "method_name", "spmamba"),
            "preset": getattr(cfg, "name", None),
            "score": float(result.score),
            "threshold": float(result.threshold),
            "pixel_threshold": float(result.pixel_threshold),
            "abnormal": bool(result.abnormal),
            "verdict": "abnormal" if result.abnormal else "normal",
            "slice_axis": int(result.slice_axis),
            "slice_scores": [[int(i), float(s)] for i, s in result.slice_scores],
            "regions": _round(top),
            "n_regions": len(regions),
            "shape": [int(s) for s in volume.array.shape],
            "spacing_mm": _round(zooms.tolist(), 4),
            "detector_timings": _round(dict(getattr(result, "timings", {}) or {}), 4),
            # models with alignment: how the study was registered to the model's reference (else None)
            "alignment": _round(result.alignment, 4) if result.alignment else None,
        }
        return out, time.perf_counter() - t0


def _write_label(mask: np.ndarray, affine: np.ndarray, path: str) -> None:
    """uint8 label on the input grid (NIfTI via nibabel, NRRD via pynrrd in LPS as Slicer expects)."""
    mask = np.ascontiguousarray(mask.astype(np.uint8))
    if path.endswith(".nrrd"):
        import nrrd

        lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=float)[:3, :]
        header = {
            "space": "left-posterior-superior",
            "space directions": lps[:, :3].T,
            "space origin": lps[:, 3],
            "kinds": ["domain", "domain", "domain"],
            "encoding": "gzip",
        }
        nrrd.write(path, mask, header, index_order="F")
    else:
        import nibabel as nib

        img = nib.Nifti1Image(mask, np.asarray(affine, dtype=float))
        img.set_qform(np.asarray(affine, dtype=float), code=1)
        img.set_sform(np.asarray(affine, dtype=float), code=1)
        nib.save(img, path)


class _BaseAnomalyInfer(InferTask):
    def __init__(self, detection: Detection, type: Union[str, InferType], labels: Any, description: str):
        super().__init__(
            type=type,
            labels=labels,
            dimension=3,
            description=description,
            config={"result_extension": ".nii.gz"},
        )
        self.detection = detection

    def is_valid(self) -> bool:
        # listed in /info even before a model exists (with ready=false), so clients can offer "train first"
        return True

    def get_path(self, validate=True):
        return self.detection.store.current_path()

    def info(self) -> Dict[str, Any]:
        i = super().info()
        i["model"] = self.detection.store.describe()
        i["model_version"] = i["model"]["version"]
        i["result_extensions"] = list(RESULT_EXTENSIONS)
        return i

    def _write(self, request: Dict[str, Any], write) -> Tuple[str, float]:
        ext = _result_extension(request)
        t0 = time.perf_counter()
        fd, path = tempfile.mkstemp(prefix="spmamba_", suffix=ext)
        os.close(fd)
        try:
            write(path)
        except BaseException:
            os.unlink(path)
            raise
        return path, time.perf_counter() - t0


class AnomalyInfer(_BaseAnomalyInfer):
    """``spmamba``: float32 heatmap on the input grid + volume score, threshold, verdict, slices, regions."""

    def __init__(self, detection: Detection):
        super().__init__(
            detection,
            type=InferType.OTHERS,
            labels=[],
            description="SP-Mamba unsupervised anomaly heatmap (float32, higher = more anomalous) with scores",
        )

    def __call__(self, request) -> Tuple[Union[str, None], Dict]:
        from spmamba.volume import save_volume

        begin = time.perf_counter()
        volume, result, detector, lat = self.detection.run(request.get("image"), request.get("upload_name"))
        summary, t_regions = self.detection.summary(volume, result, detector)
        path, t_write = self._write(request, lambda p: save_volume(result.heatmap, volume.affine, p))
        lat.update({"regions": t_regions, "write": t_write, "total": time.perf_counter() - begin})
        summary["latencies"] = _round(lat, 4)
        summary["result"] = "heatmap"
        logger.info(
            f"spmamba: score={summary['score']:.4g} thr={summary['threshold']:.4g} {summary['verdict']} "
            f"model={summary['model_version']} latencies={summary['latencies']}"
        )
        return path, summary


class AnomalySegmentationInfer(_BaseAnomalyInfer):
    """``spmamba_seg``: label 1 = "anomaly" where the heatmap exceeds the calibrated pixel threshold."""

    def __init__(self, detection: Detection):
        super().__init__(
            detection,
            type=InferType.SEGMENTATION,
            labels={"anomaly": 1},
            description="SP-Mamba anomalous regions (heatmap above the calibrated threshold) as a label map",
        )

    def __call__(self, request) -> Tuple[Union[str, None], Dict]:
        begin = time.perf_counter()
        volume, result, detector, lat = self.detection.run(request.get("image"), request.get("upload_name"))
        summary, t_regions = self.detection.summary(volume, result, detector)
        mask = np.asarray(result.heatmap) > result.pixel_threshold
        path, t_write = self._write(request, lambda p: _write_label(mask, volume.affine, p))
        lat.update({"regions": t_regions, "write": t_write, "total": time.perf_counter() - begin})
        summary["latencies"] = _round(lat, 4)
        summary["result"] = "label"
        summary["label_names"] = {"anomaly": 1}
        return path, summary
