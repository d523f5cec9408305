"""Scoring: score every study with the served model and store the result in its datastore info.

``info["anomaly"] = {score, threshold, abnormal, model_version, ts, image_ts}`` (or ``{error, model_version}`` for a
study the library cannot read). A study already scored by the same model version and unchanged since is skipped,
so re-running (MONAI Label runs scoring at start-up and after every training) is cheap.

In the background (MONAI Label's scoring subprocess: start-up, after a training, when an active-learning request
finds unscored studies) the scoring runs at low priority -- ``nice`` +10 and one torch thread -- so a clinician's
detection in the server keeps the CPU; each score is stored as soon as it is made, studies that active learning
ranks (unreviewed and normal) first. ``?run_sync=true`` scores in the request (FastAPI's thread pool).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Dict, Optional

from fastapi import HTTPException
from monailabel.interfaces.tasks.scoring import ScoringMethod
from spmamba.cpu import lower_priority

from ..configs import CURATION_KEY, SCORE_KEY
from ..detection import Detection

logger = logging.getLogger(__name__)


def cached_score(info: Dict[str, Any], version: str) -> Optional[Dict[str, Any]]:
    rec = info.get(SCORE_KEY)
    if isinstance(rec, dict) and rec.get("model_version") == version and rec.get("image_ts") == info.get("ts"):
        return rec
    return None


def score_study(detection: Detection, datastore, image_id: str, force: bool = False) -> Dict[str, Any]:
    """Score one study (or reuse its stored score) and store it in the study's info; returns the record."""
    detector = detection.store.get()  # 409 when there is no model
    info = datastore.get_image_info(image_id)
    rec = None if force else cached_score(info, detector.version)
    if rec is not None:
        return rec
    path = datastore.get_image_uri(image_id)
    try:
        volume, result, det, _ = detection.run(path, foreground=False)  # background: never pauses a training
        rec = {
            "score": float(result.score),
            "threshold": float(result.threshold),
            "abnormal": bool(result.abnormal),
            "model_version": det.version,
        }
    except HTTPException as e:
        if e.status_code == 409:
            raise
        rec = {"error": str(e.detail), "model_version": detector.version}
    rec["ts"] = int(time.time())
    rec["image_ts"] = info.get("ts")
    datastore.update_image_info(image_id, {SCORE_KEY: rec})
    return rec


def in_task_subprocess() -> bool:
    """True in MONAI Label's task subprocess (``python -m monailabel.interfaces.utils.app -m scoring ...``)."""
    main = sys.modules.get("__main__")
    return getattr(getattr(main, "__spec__", None), "name", None) == "monailabel.interfaces.utils.app"


class AnomalyScoring(ScoringMethod):
    def __init__(self, detection: Detection):
        super().__init__("Score every study with the served SP-Mamba model; stores info.anomaly (score, verdict)")
        self.detection = detection

    def __call__(self, request, datastore):
        force = str(request.get("force", "false")).lower() in ("1", "true", "yes")
        if in_task_subprocess():
            lower_priority()
        detector = self.detection.store.get()
        start = time.time()
        summary: Dict[str, Any] = {"model_version": detector.version, "scored": 0, "cached": 0, "failed": 0}
        scores = {}
        ranked_first = (None, "normal")  # the candidates of the active-learning strategies
        for image_id in sorted(datastore.list_images(), key=lambda i: (datastore.curation(i) not in ranked_first, i)):
            before = cached_score(datastore.get_image_info(image_id), detector.version)
            rec = score_study(self.detection, datastore, image_id, force=force)
            if "error" in rec:
                summary["failed"] += 1
            elif before is not None and not force:
                summary["cached"] += 1
            else:
                summary["scored"] += 1
            scores[image_id] = {
                k: rec.get(k) for k in ("score", "abnormal", "error") if k in rec
            }
            scores[image_id]["curation"] = datastore.get_image_info(image_id).get(CURATION_KEY)
        summary["scores"] = scores
        summary["seconds"] = round(time.time() - start, 2)
        logger.info(f"Scoring: {summary['scored']} scored, {summary['cached']} cached, {summary['failed']} failed")
        return summary
