"""Active learning for curation: which study should a person look at next?

* ``suspect_normal``: among studies marked **normal** (the training set), the one the current model finds most
  anomalous -- a likely contaminant of the training data to review.
* ``most_anomalous``: among **unreviewed** studies (no curation state), the most anomalous one.

The answer never waits for a detection: it ranks the candidates whose stored ``info.anomaly`` was made by the
served model version. When some are not scored yet (new studies, or a new model after a training), the app's
background scoring is started (MONAI Label's scoring subprocess, one at a time, low priority; see
``lib/scoring``) and the answer says how many are still being scored: ``pending`` (and ``message``), with
``complete`` false. With no scored candidate yet the answer has no ``id``, only ``pending`` and ``message``; ask
again later. No candidate at all -> ``{}`` (MONAI Label's "nothing to do" answer).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

from monailabel.interfaces.tasks.strategy import Strategy

from ..detection import Detection
from ..scoring.anomaly import cached_score, score_study

logger = logging.getLogger(__name__)


class _MostAnomalous(Strategy):
    state: Optional[str] = None
    reason = ""

    def __init__(self, detection: Detection, description: str, start_scoring: Optional[Callable[[], str]] = None):
        """``start_scoring()`` starts the background scoring unless one is queued or running and says which
        (``started``/``running``/``unavailable``); without it, missing scores are computed here (no server)."""
        super().__init__(description)
        self.detection = detection
        self.start_scoring = start_scoring

    def __call__(self, request, datastore) -> Dict[str, Any]:
        detector = self.detection.store.get()  # 409 "train first" when there is no model
        candidates = datastore.studies_by_state(self.state)
        if not candidates:
            return {}
        scored: Dict[str, Dict[str, Any]] = {}
        pending, failed = [], 0
        for image_id in candidates:
            rec = cached_score(datastore.get_image_info(image_id), detector.version)
            if rec is None and self.start_scoring is None:
                rec = score_study(self.detection, datastore, image_id)
            if rec is None:
                pending.append(image_id)
            elif "score" in rec:
                scored[image_id] = rec
            else:
                failed += 1
        answer: Dict[str, Any] = {
            "candidates": len(candidates),
            "scored": len(scored),
            "failed": failed,
            "pending": len(pending),
            "complete": not pending,
            "model_version": detector.version,
        }
        if pending:
            answer["scoring"] = self.start_scoring() if self.start_scoring else "unavailable"
            n = len(pending)
            answer["message"] = (
                f"{n} {'study' if n == 1 else 'studies'} still being scored in the background; this answer ranks "
                f"the {len(scored)} scored of {len(candidates)} candidates: ask again for the complete answer"
            )
        if not scored:
            return answer if pending else {}
        image_id, rec = max(scored.items(), key=lambda kv: kv[1]["score"])
        logger.info(f"{request.get('strategy')}: {image_id} score={rec['score']:.4g} of {len(scored)} scored "
                    f"candidates ({len(pending)} pending)")
        answer.update({
            "id": image_id,
            "score": rec["score"],
            "threshold": rec.get("threshold"),
            "abnormal": rec.get("abnormal"),
            "model_version": rec.get("model_version"),
            "reason": self.reason,
        })
        return answer


class SuspectNormal(_MostAnomalous):
    state = "normal"
    reason = "marked normal but the most anomalous of the training studies: check it is not a contaminant"

    def __init__(self, detection: Detection, start_scoring: Optional[Callable[[], str]] = None):
        super().__init__(detection, "Normal-marked study the model finds most anomalous (likely contaminant)",
                         start_scoring)


class MostAnomalousUnreviewed(_MostAnomalous):
    state = None
    reason = "the most anomalous study that nobody has reviewed yet"

    def __init__(self, detection: Detection, start_scoring: Optional[Callable[[], str]] = None):
        super().__init__(detection, "Most anomalous unreviewed study", start_scoring)
