"""Inference tasks: ``spmamba`` (float32 heatmap + scores JSON) and ``spmamba_seg`` (the abnormal voxels as a label);
with ``--conf method NAME`` they are named ``NAME`` and ``NAME_seg`` and serve that method's model (the JSON's
``method`` says which).

Both call ``spmamba`` only, through :class:`lib.detection.Detection`: read with ``spmamba.io.load_volume``
(which refuses bad input with a message naming the problem), detect with the served ``Detector``, find regions with
``spmamba.scoring.find_regions`` and write heatmap and label with ``spmamba.io.save_volume`` (nibabel/pynrrd;
NRRD in LPS as Slicer expects; MONAI Label's ITK writer is slow and its ``Restored`` transform needs torchvision,
so neither is used).

A study from a PACS (``--studies http[s]://.../dicom-web``) can go back into it: ``params.store_results`` (or the
app's ``pacs_results``) stores the heatmap as a DICOM Parametric Map and the abnormal voxels as a Segmentation
referencing the series (``lib.pacs.store_results``); the JSON's ``pacs`` says what was stored.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Dict, Tuple, Union

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from spmamba.io import save_volume
from spmamba.scoring import abnormal_voxels

from ..detection import Detection, rounded
from ..errors import bad_request, method_title

logger = logging.getLogger(__name__)

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _result_extension(request: Dict[str, Any]) -> str:
    ext = request.get("result_extension") or ".nii.gz"
    ext = str(ext).strip().lower()
    ext = ext if ext.startswith(".") else "." + ext
    if ext not in RESULT_EXTENSIONS:
        raise bad_request(f"result_extension {ext!r} is not supported: use one of {', '.join(RESULT_EXTENSIONS)}")
    return ext


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
        i["output"] = self.output  # what the result file is: clients (the Slicer module) list heatmap tasks as methods
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

    def _store_in_pacs(self, request: Dict[str, Any]) -> bool:
        """Whether this detection goes back into the PACS: ``params.store_results`` (true/false), else the app's
        ``pacs_results`` setting for series of a PACS. Asked for where there is no PACS series: a 400."""
        ds = getattr(self.detection, "datastore", None)
        pacs_series = bool(getattr(ds, "remote", False) and request.get("image_id"))
        asked = request.get("store_results")
        if asked is None:
            return pacs_series and self.detection.settings.pacs_results
        if _flag(asked) and not pacs_series:
            raise bad_request("store_results needs a series of the PACS (?image=SeriesInstanceUID) and the app "
                              "started with --studies http[s]://HOST/dicom-web; an uploaded file has no series to "
                              "reference")
        return _flag(asked)

    def _answer(self, request: Dict[str, Any], write_result, result: str) -> Tuple[str, Dict[str, Any]]:
        """Detect, summarise, write the result file with ``write_result(volume, detection_result, path)``; returns
        (path, JSON) with the latencies of each part."""
        begin = time.perf_counter()
        store = self._store_in_pacs(request)
        volume, res, detector, lat = self.detection.run(request.get("image"), request.get("upload_name"))
        summary, t_regions = self.detection.summary(volume, res, detector)
        path, t_write = self._write(request, lambda p: write_result(volume, res, p))
        if store:
            from ..pacs import store_results

            summary["pacs"] = store_results(self.detection.datastore, request["image_id"], volume, res, detector)
            lat["pacs"] = summary["pacs"].get("seconds", 0.0)
        lat.update({"regions": t_regions, "write": t_write, "total": time.perf_counter() - begin})
        summary["latencies"] = rounded(lat, 4)
        summary["result"] = result
        return path, summary


class AnomalyInfer(_BaseAnomalyInfer):
    """``spmamba``: float32 heatmap on the input grid + volume score, threshold, verdict, slices, regions."""

    output = "heatmap"

    def __init__(self, detection: Detection):
        super().__init__(
            detection,
            type=InferType.OTHERS,
            labels=[],
            description=f"{method_title(detection.settings.method)} unsupervised anomaly heatmap (float32, higher = "
                        "more anomalous) with scores",
        )

    def __call__(self, request) -> Tuple[Union[str, None], Dict]:
        path, summary = self._answer(request, lambda v, r, p: save_volume(r.heatmap, v.affine, p), "heatmap")
        logger.info(
            f"spmamba: score={summary['score']:.4g} thr={summary['threshold']:.4g} {summary['verdict']} "
            f"model={summary['model_version']} latencies={summary['latencies']}"
        )
        return path, summary


class AnomalySegmentationInfer(_BaseAnomalyInfer):
    """``spmamba_seg``: label 1 = "anomaly" on the abnormal voxels (``spmamba.scoring.abnormal_voxels``: at or above
    the calibrated pixel threshold), uint8 on the input grid."""

    output = "label"

    def __init__(self, detection: Detection):
        super().__init__(
            detection,
            type=InferType.SEGMENTATION,
            labels={"anomaly": 1},
            description=f"{method_title(detection.settings.method)} anomalous regions (heatmap at or above the "
                        "calibrated threshold) as a label map",
        )

    def __call__(self, request) -> Tuple[Union[str, None], Dict]:
        def write_label(volume, res, path):
            save_volume(abnormal_voxels(res.heatmap, res.pixel_threshold), volume.affine, path, dtype=np.uint8)

        path, summary = self._answer(request, write_label, "label")
        summary["label_names"] = {"anomaly": 1}
        return path, summary
