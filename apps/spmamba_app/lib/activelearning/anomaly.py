"""Active learning for curation: which study should a person look at next?

* ``suspect_normal``: among studies marked **normal** (the training set), the one the current model finds most
  anomalous -- a likely contaminant of the training data to review.
* ``most_anomalous``: among **unreviewed** studies (no curation state), the most anomalous one.

Scores come from the stored ``info.anomaly`` when it was made by the current model version; missing ones are
computed on the spot (and stored). No candidate -> ``{}`` (MONAI Label's "nothing to do" answer).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from monailabel.interfaces.tasks.strategy import Strategy

from ..infers.anomaly import Detection
from ..scoring.anomaly import score_study

logger = logging.getLogger(__name__)


class _MostAnomalous(Strategy):
    state: Optional[str] = None
    reason = ""

    def __init__(self, detection: Detection, description: str):
        super().__init__(description)
        self.detection = detection

    def __call__(self, request, datastore) -> Dict[str, Any]:
        self.detection.store.get()  # 409 "train first" when there is no model
        candidates = datastore.studies_by_state(self.state)
        best = None
        for image_id in candidates:
            rec = score_study(self.detection, datastore, image_id)
            if "score" not in rec:
                continue
            if best is None or rec["score"] > best[1]["score"]:
                best = (image_id, rec)
        if best is None:
            return {}
        image_id, rec = best
        logger.info(f"{request.get('strategy')}: {image_id} score={rec['score']:.4g} of {len(candidates)} candidates")
        return {
            "id": image_id,
            "score": rec["score"],
            "threshold": rec.get("threshold"),
            "abnormal": rec.get("abnormal"),
            "model_version": rec.get("model_version"),
            "candidates": len(candidates),
            "reason": self.reason,
        }


class SuspectNormal(_MostAnomalous):
    state = "normal"
    reason = "marked normal but the most anomalous of the training studies: check it is not a contaminant"

    def __init__(self, detection: Detection):
        super().__init__(detection, "Normal-marked study the model finds most anomalous (likely contaminant)")


class MostAnomalousUnreviewed(_MostAnomalous):
    state = None
    reason = "the most anomalous study that nobody has reviewed yet"

    def __init__(self, detection: Detection):
        super().__init__(detection, "Most anomalous unreviewed study")
