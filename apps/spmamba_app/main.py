"""SP-Mamba MONAI Label app: unsupervised anomaly detection, training on curated normals, curation.

    monailabel start_server --app apps/spmamba_app --studies DIR [--conf preset fast] [--conf model PATH] ...
    monailabel start_server --app apps/spmamba_app --studies http://127.0.0.1:8042/dicom-web ...   (a PACS)

Studies come from a folder or a DICOMweb PACS (lib/pacs.py); sign-in is MONAI Label's, fixed (lib/auth.py);
docs/DEPLOY.md.

Glue only: every scientific step is a call into ``spmamba`` (see docs/LIBRARY_API.md); the REST surface and the
``--conf`` options are documented in docs/APP.md.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from typing import Any, Callable, Dict

import spmamba
from spmamba.server import exposure_warning
from lib.activelearning import MostAnomalousUnreviewed, SuspectNormal
from lib.configs import CURATION_KEY, CURATION_STATES, ConfError, parse_conf
from lib.datastore import CuratedDatastore
from lib.detection import Detection
from lib.errors import bad_request, conflict, not_found
from lib.infers import AnomalyInfer, AnomalySegmentationInfer
from lib.model_store import ModelStore
from lib.scoring import AnomalyScoring
from lib.trainers import AnomalyTrain
from lib.versions import UnknownVersion, VersionHistory
from monailabel.config import settings as ml_settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

import lib.routes as routes

logger = logging.getLogger(__name__)


def served_host() -> str:
    """The address ``monailabel start_server`` binds (its ``--host``/``-i``, default 0.0.0.0); 127.0.0.1 outside
    it (tests, task subprocesses)."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) != "monailabel.main":
        return "127.0.0.1"
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg in ("-i", "--host") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return "0.0.0.0"


def refuse_to_start(error: Exception) -> None:
    """A bad ``--conf`` in ``monailabel start_server``: one line on stderr and exit 2, not uvicorn's traceback.

    MONAI Label builds the app inside uvicorn's start-up (the ASGI lifespan), where any exception is printed as a
    ~100-line traceback before "Application startup failed". Elsewhere (tests, MONAI Label's task subprocesses)
    this returns and the caller re-raises the error.
    """
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) != "monailabel.main":
        return
    sys.stderr.write(f"SP-Mamba app not started: {error}\n")
    sys.stderr.flush()
    logging.shutdown()
    os._exit(2)


class SPMambaApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        try:
            self.settings = parse_conf(app_dir, studies, conf)
        except ConfError as e:
            refuse_to_start(e)
            raise
        os.makedirs(self.settings.model_dir, exist_ok=True)
        self.model_store = ModelStore(self.settings.published_model, self.settings.model, self.settings.device,
                                      self.settings.method)
        self.versions = VersionHistory(self.settings.model_dir, self.settings.published_model,
                                       self.settings.keep_versions, self.settings.model)
        self.detection = Detection(self.settings, self.model_store)
        self._scoring_lock = threading.Lock()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SP-Mamba anomaly detection",
            description="Unsupervised anomaly detection (SP-Mamba) trained on studies curated as normal",
            version=spmamba.__version__,
            labels=None,
        )
        self._datastore.seed_curation(self.settings.seed_curation)

    # ------------------------------------------------------------------ tasks
    def init_datastore(self) -> Datastore:
        """A local studies folder, or the image series of a DICOMweb PACS (``--studies http[s]://...``,
        lib/pacs.py; MONAI Label's stock DICOMweb set-up, which downloads dcmqi at start-up, is not used)."""
        s = self.settings
        if s.dicomweb:
            from lib.pacs import PacsDatastore, cache_folder

            self.studies = s.dicomweb
            return PacsDatastore(s.dicomweb, cache_folder(s.dicomweb_cache, s.dicomweb), s.dicomweb_refresh_s,
                                 s.dicomweb_modality.split(",") if s.dicomweb_modality else (),
                                 timeout=s.dicomweb_timeout_s, read_only=ml_settings.MONAI_LABEL_DATASTORE_READ_ONLY)
        return CuratedDatastore(
            self.studies,
            auto_reload=ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=ml_settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        """One heatmap task and one segmentation task named after the app's method (``--conf method``): spmamba and
        spmamba_seg by default, e.g. voxelwise and voxelwise_seg with ``--conf method voxelwise``."""
        method = self.settings.method
        self.detection.datastore = self._datastore  # PACS results are stored through it
        return {
            method: AnomalyInfer(self.detection),
            f"{method}_seg": AnomalySegmentationInfer(self.detection),
        }

    def init_trainers(self) -> Dict[str, TrainTask]:
        """The training task, named after the app's method like the infer task."""
        return {self.settings.method: AnomalyTrain(self.settings)}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {
            "suspect_normal": SuspectNormal(self.detection, self.score_in_background),
            "most_anomalous": MostAnomalousUnreviewed(self.detection, self.score_in_background),
            "random": Random(),
        }

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return {"anomaly": AnomalyScoring(self.detection)}

    def init_batch_infer(self) -> Callable:
        return super().init_batch_infer()

    # ------------------------------------------------------------------ info
    def info(self) -> Dict[str, Any]:
        meta = super().info()
        ds = self._datastore
        counts = {state: len(ds.studies_by_state(state)) for state in CURATION_STATES}
        counts["unreviewed"] = len(ds.studies_by_state(None))
        meta["spmamba"] = {
            "model": self.model_store.describe(),
            "curation_key": CURATION_KEY,
            "curation_states": list(CURATION_STATES),
            "curation": counts,
            "scoring": self.scoring_state(),
            "versions": [v["version"] for v in self.versions.list()],  # kept for rollback: GET /model/versions
            "settings": self.settings.to_json(),
            "studies": self.studies_state(),
        }
        return meta

    def studies_state(self) -> Dict[str, Any]:
        """``/info/`` -> ``spmamba.studies``: where the studies come from (``local`` folder or ``dicomweb`` PACS,
        with whether it answered last time) and whether detections are stored back into the PACS."""
        ds = self._datastore
        if getattr(ds, "remote", False):
            return {"kind": "dicomweb", "url": ds.url, "pacs": dict(ds.pacs_state),
                    "refresh_s": self.settings.dicomweb_refresh_s, "store_results": self.settings.pacs_results}
        return {"kind": "local", "folder": self.studies}

    # ------------------------------------------------------------------ model versions
    def model_versions(self) -> Dict[str, Any]:
        """``GET /model/versions``: the served model and the kept versions (newest published first)."""
        served = self.model_store.describe()
        current = served.get("version")
        versions = self.versions.list(current)
        return {
            "current": current,
            "served": served,
            "keep_versions": self.settings.keep_versions,
            "current_kept": any(v["current"] for v in versions),
            "versions": versions,
            "log": self.versions.log()[-20:],
        }

    def rollback_model(self, version: str) -> Dict[str, Any]:
        """``POST /model/rollback?version=V``: serve a kept version again (404 unknown; the route answers 409 while
        a training runs). The model is loaded before answering, so the answer names what is now served."""
        from spmamba.checkpoint import CheckpointError

        previous = self.model_store.describe().get("version")
        try:
            entry = self.versions.rollback(version, current=previous)
        except UnknownVersion:
            kept = [v["version"] for v in self.versions.list()]
            raise not_found(f"no kept model version {version!r}; kept: {', '.join(kept) or 'none'} "
                            "(GET /model/versions lists them)") from None
        except CheckpointError as e:
            raise conflict(f"version {version} cannot be restored: its file is damaged ({e})") from e
        served = self.model_store.describe()
        if served.get("version") != version:
            raise conflict(f"version {version} was restored to {self.settings.published_model} but the server serves "
                           f"{served.get('version')} from {served.get('path')}: check --conf model")
        logger.info(f"Rolled back the served model from {previous} to {version}")
        self.async_scoring(None)  # stored scores follow the served version (incremental)
        return {"version": version, "previous_version": previous, "served": served, "entry": entry}

    # ------------------------------------------------------------------ inference
    def infer(self, request, datastore=None):
        """Refuse image references that are neither a datastore id nor a file MONAI Label itself received."""
        image = request.get("image")
        if isinstance(image, str):
            ds = datastore if datastore else self.datastore()
            ds.sync()
            if os.path.isabs(image) and os.path.isfile(image):
                real = os.path.realpath(image)
                roots = [tempfile.gettempdir(), ml_settings.MONAI_LABEL_SESSION_PATH or "",
                         os.path.join(os.path.expanduser("~"), ".cache", "monailabel", "sessions")]
                if not any(r and real.startswith(os.path.realpath(r) + os.sep) for r in roots):
                    raise bad_request("image must be a datastore id or an uploaded file")
            else:
                ds.require_image(image)  # 400 path-like, 404 unknown, 422 a PACS series that is not an image
                request = {**request, "image_id": image}  # the tasks store PACS results under the series' id
        return super().infer(request, datastore)

    # ------------------------------------------------------------------ active learning / scoring
    def next_sample(self, request):
        """As MONAI Label's, minus the automatic re-scoring of every study after each request. An answer without an
        ``id`` but with ``pending`` (candidates still being scored in the background) is passed on as it is."""
        strategy = request.get("strategy") or "random"
        task = self._strategies.get(strategy)
        if task is None:
            raise not_found(f"no active-learning strategy {strategy!r}; available: {', '.join(sorted(self._strategies))}")
        res = task(request, self.datastore())
        if not res or not res.get("id"):
            return res if res and res.get("pending") else {}
        res["path"] = self._datastore.get_image_uri(res["id"])
        return res

    def scoring(self, request, datastore=None):
        method = request.get("method")
        if method and method not in self._scoring_methods:
            raise not_found(f"no scoring method {method!r}; available: {', '.join(sorted(self._scoring_methods))}")
        return super().scoring(request, datastore)

    def score_in_background(self) -> str:
        """Start MONAI Label's scoring subprocess (low priority, see lib/scoring) unless one is queued or running.
        Returns ``running`` (one already is), ``started`` or ``unavailable`` (not in a server)."""
        with self._scoring_lock:
            if routes.task_running("scoring"):
                return "running"
            if not self._server_mode:
                return "unavailable"
            res = self.async_scoring("anomaly")
            return "started" if res else "unavailable"

    def scoring_state(self) -> Dict[str, Any]:
        """``/info/`` -> ``spmamba.scoring``: is a background scoring queued or running, how many studies lack a
        score of the served model (``unscored``; None without a model)."""
        from lib.scoring import cached_score

        running = routes.task_running("scoring")
        det = self.model_store.peek()
        unscored = None
        if det is not None:
            ds = self._datastore
            unscored = sum(cached_score(ds.get_image_info(i), det.version) is None for i in ds.list_images())
        return {"running": running, "unscored": unscored}

    def async_scoring(self, method, params=None):
        """Automatic scoring (start-up, after training) only when enabled and a model exists; never fails."""
        if method is None and (not self.settings.auto_score or not self.model_store.available()):
            return {}
        try:
            return super().async_scoring(method, params)
        except Exception as e:  # noqa: BLE001 - e.g. no server to notify when run outside one
            logger.warning(f"Automatic scoring not started: {e}")
            return {}

    def on_init_complete(self):
        try:
            import monailabel.app as server

            routes.install(server.app)
        except Exception:  # noqa: BLE001 - the stock routes still work
            logger.exception("Could not install the validating routes; using MONAI Label's stock ones")
        warning = exposure_warning(served_host(), bool(ml_settings.MONAI_LABEL_AUTH_ENABLE))
        if warning:
            logger.warning(warning)
        super().on_init_complete()
        if self.settings.auto_train and not self.model_store.available():
            trainer = self._trainers.get(self.settings.method)
            try:
                trainer.precheck({}, self._datastore)
                logger.info("No model yet: starting a training on the curated normal studies (auto_train)")
                self.async_training(self.settings.method)
            except Exception as e:  # noqa: BLE001
                logger.warning(f"auto_train: not started ({getattr(e, 'detail', e)})")
