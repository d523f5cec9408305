"""Which checkpoint the app serves, loaded once and reloaded when a newer one is published.

Candidates are ``--conf model PATH`` (a checkpoint made by ``spmamba train``) and the app's own published model
(``<model_dir>/spmamba.pt``, written atomically by the training task). The most recently modified existing
candidate is served, so a finished training replaces the served model without a restart, and an explicit
``--conf model`` still wins until the first training publishes.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, List, Optional, Tuple

from .errors import NO_MODEL_MSG, HTTPException, conflict, method_title
from .versions import served_path

logger = logging.getLogger(__name__)


class ModelStore:
    def __init__(self, published: str, explicit: Optional[str] = None, device: str = "auto", method: str = "spmamba"):
        self.published = published
        self.explicit = explicit
        self.device = device
        self.method = method  # the app's method: what its "no model yet" message tells to train
        self._lock = threading.Lock()
        self._key: Optional[Tuple[str, int, int]] = None
        self._detector: Any = None

    def candidates(self) -> List[str]:
        return [p for p in (self.explicit, self.published) if p]

    def current_path(self) -> Optional[str]:
        return served_path(self.published, self.explicit)

    def available(self) -> bool:
        return self.current_path() is not None

    def get(self) -> Any:
        """The current :class:`spmamba.detector.Detector`; 409 if there is none, 409 naming the file if unloadable."""
        path = self.current_path()
        if path is None:
            raise conflict(NO_MODEL_MSG.format(name=method_title(self.method), method=self.method,
                                               where=f"looked for {', '.join(self.candidates())}"))
        try:
            st = os.stat(path)
        except OSError:
            return self.get()  # replaced between the two calls: look again
        key = (path, st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._key == key and self._detector is not None:
                return self._detector
            from spmamba.checkpoint import CheckpointError
            from spmamba.detector import Detector

            try:
                detector = Detector.load(path, device=self.device)
            except CheckpointError as e:
                if self._detector is not None:
                    logger.error(f"Cannot load {path} ({e}); still serving version {self._detector.version}")
                    return self._detector
                raise conflict(f"The model file {path} cannot be loaded: {e}") from e
            logger.info(f"Serving SP-Mamba model {detector.version} from {path}")
            self._key, self._detector = key, detector
            return detector

    def peek(self) -> Optional[Any]:
        """The current detector, or None when there is none or it cannot be loaded (never raises)."""
        try:
            return self.get()
        except HTTPException:
            return None
        except Exception:  # noqa: BLE001 - informational callers only
            logger.exception("Loading the model failed")
            return None

    def describe(self) -> dict:
        det = self.peek()
        if det is None:
            return {"ready": False, "version": None, "path": self.current_path()}
        return {
            "ready": True,
            "version": det.version,
            "path": self._key[0] if self._key else None,
            "preset": det.config.name,
            "created": det.meta.get("created"),
        }
