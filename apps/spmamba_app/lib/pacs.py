"""Studies from a PACS over DICOMweb (``--studies http://HOST/dicom-web``), and results stored back into it.

:class:`PacsDatastore` is the app's :class:`~lib.datastore.CuratedDatastore` with the PACS as the list of studies:

* the studies are the PACS's **image** series (QIDO-RS), ids = SeriesInstanceUIDs. Series of non-image objects are
  left out: by Modality first (SEG, SR, PR, KO, RT..., REG ...) and then by the SOP class of one instance, asked once
  per series (``spmamba.io.IMAGE_SOP_CLASSES``: CT, MR, PET, NM), so the product's own results (a Parametric Map
  has Modality OT, a Segmentation SEG) never show up as new studies;
* the list is asked again after ``dicomweb_refresh_s`` seconds (default 30; MONAI Label's own DICOMweb datastore
  caches it for 2 h), so new series appear without a restart; ``refresh()`` asks at once. When the PACS cannot be
  reached the series already known are served (and ``status()["pacs"]`` says why), so the app starts and works
  offline on what it has cached;
* a series is fetched (WADO-RS, MONAI Label's ``dicom_web_download_series``) and converted
  (MONAI Label's ``dicom_to_nifti``, SimpleITK) only when it is first needed (detection, download, training,
  scoring), under a per-series file lock (the server and MONAI Label's task subprocesses share the cache), into a
  temporary folder renamed into place when complete, so an interrupted download is never used. Its headers are
  checked first (``spmamba.io.inspect_dicom_series``): a malformed series is a 422 that says what is wrong;
* curation (``info.curation``), stored scores and the rest of each series' info live in the cache's
  ``datastore_v2.json`` as for local studies; uploads and deletions are refused (the PACS owns the studies).

:func:`store_results` writes a detection back as a DICOM Parametric Map (the float heatmap) and a DICOM Segmentation
(the abnormal voxels), both referencing the source series (``spmamba.dicom_results``), with STOW-RS.

MONAI Label 0.8.5's own ``DICOMWebDatastore`` is not used as it is: it keeps the list for 2 h (fixed at import), can
convert a half-downloaded series, drops a series' info when it is fetched and turns every SEG in the PACS into a
training label; its client class and DICOM utilities are used.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import requests
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel

from .configs import CURATION_KEY
from .datastore import CuratedDatastore
from .errors import check_id, conflict, not_found, unprocessable

logger = logging.getLogger(__name__)

#: info key of a PACS series (its QIDO attributes); a study without it is not from the PACS
PACS_KEY = "pacs"
#: modalities of series that hold no images of the patient (skipped without asking for their SOP class)
NON_IMAGE_MODALITIES = {"SEG", "SR", "PR", "KO", "REG", "RWV", "DOC", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD",
                        "FID", "PLAN", "AU", "ECG", "HD", "SMR"}
_QIDO_FIELDS = ["0008103E", "00201209", "00080021", "00080031", "00100020", "0020000D", "00080060", "00200011"]


def bad_gateway(msg: str) -> HTTPException:
    return HTTPException(status_code=502, detail=msg)


class TimeoutSession(requests.Session):
    """A requests session whose calls time out (dicomweb-client passes no timeout: a PACS that hangs would hold a
    request thread for ever)."""

    def __init__(self, timeout: float):
        super().__init__()
        self.default_timeout = float(timeout)

    def request(self, method, url, **kwargs):  # noqa: D401 - requests' signature
        kwargs.setdefault("timeout", self.default_timeout)
        return super().request(method, url, **kwargs)


def _first(ds: Dict[str, Any], tag: str, default: Any = "") -> Any:
    value = (ds.get(tag) or {}).get("Value") or [default]
    v = value[0]
    if isinstance(v, dict):  # person names
        return v.get("Alphabetic", default)
    return v


def cache_folder(root: str, url: str) -> str:
    """The cache of one PACS: ``root/<first 16 hex digits of sha256(url)>``."""
    return os.path.join(root, hashlib.sha256(url.encode()).hexdigest()[:16])


def make_client(url: str, timeout: float, username: str = "", password: str = ""):
    """MONAI Label's DICOMweb client (it accepts Orthanc's and other servers' multipart answers) on a session with a
    timeout and, when given, HTTP basic authentication (MONAI Label's MONAI_LABEL_DICOMWEB_USERNAME/PASSWORD)."""
    from monailabel.config import settings
    from monailabel.datastore.dicom import DICOMwebClientX

    session = TimeoutSession(timeout)
    if username and password:
        session.auth = (username, password)
    client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                             stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    # dicomweb-client retries every failed request 5 times with waits doubling from 2 s (about 30 s, also for a
    # refused connection); one retry after 0.5 s keeps an unreachable PACS from holding a request for minutes
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=250)
    return client


class PacsDatastore(CuratedDatastore):
    """The image series of a DICOMweb server as curated studies (see the module docstring)."""

    remote = True

    def __init__(self, url: str, cache_dir: str, refresh_s: float = 30.0, modalities: Sequence[str] = (),
                 timeout: float = 30.0, read_only: bool = False, client=None):
        from monailabel.config import settings

        self.url = url.rstrip("/")
        self.refresh_s = float(refresh_s)
        self.modalities = [m.strip().upper() for m in modalities if m and m.strip()]
        user = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
        password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
        self._client = client or make_client(self.url, timeout, user, password)
        self._list_lock = threading.Lock()
        self._listed: Optional[List[str]] = None
        self._listed_at = 0.0
        self._non_image: Dict[str, str] = {}  # series uid -> why it is not a study (SOP class / modality)
        self.pacs_state: Dict[str, Any] = {"url": self.url, "reachable": None, "error": None, "checked": None}
        os.makedirs(cache_dir, exist_ok=True)
        super().__init__(cache_dir, auto_reload=False, read_only=read_only)
        self._dicom_root = os.path.join(cache_dir, "dicom")
        self._lock_root = os.path.join(cache_dir, ".fetch")
        os.makedirs(self._dicom_root, exist_ok=True)
        os.makedirs(self._lock_root, exist_ok=True)

    # ------------------------------------------------------------------ what MONAI Label's datastore asks
    def name(self) -> str:
        return self.url

    def _reconcile_datastore(self):
        """The PACS, not the cache folder, says which studies exist: nothing to reconcile."""
        return 0

    def refresh(self):
        """Ask the PACS for its series now (next :meth:`list_images`)."""
        with self._list_lock:
            self._listed_at = 0.0

    # ------------------------------------------------------------------ listing
    def _query(self) -> List[Dict[str, Any]]:
        filters = [{"Modality": m} for m in self.modalities] or [{}]
        found: Dict[str, Dict[str, Any]] = {}
        for f in filters:
            for ds in self._client.search_for_series(search_filters=f or None, fields=_QIDO_FIELDS,
                                                     get_remaining=True):
                uid = _first(ds, "0020000E")
                if uid:
                    found[str(uid)] = ds
        return list(found.values())

    def _sop_class(self, study_uid: str, series_uid: str) -> str:
        inst = self._client.search_for_instances(study_instance_uid=study_uid or None, series_instance_uid=series_uid,
                                                 fields=["00080016"], limit=1)
        return str(_first(inst[0], "00080016")) if inst else ""

    def list_images(self) -> List[str]:
        """The PACS's image series (SeriesInstanceUIDs), asked again after ``refresh_s`` seconds; the known ones
        when the PACS cannot be reached."""
        from spmamba.io import IMAGE_SOP_CLASSES, sop_class_name

        with self._list_lock:
            now = time.monotonic()
            if self._listed is not None and now - self._listed_at < self.refresh_s:
                return list(self._listed)
            try:
                found = self._query()
                new: Dict[str, Dict[str, Any]] = {}
                listed = []
                known = self._datastore.objects
                for ds in found:
                    uid = str(_first(ds, "0020000E"))
                    modality = str(_first(ds, "00080060")).upper()
                    if uid in self._non_image:
                        continue
                    if modality in NON_IMAGE_MODALITIES:
                        self._non_image[uid] = f"a {modality} series"
                        continue
                    obj = known.get(uid)
                    if obj is None or not (obj.image.info.get(PACS_KEY) or {}).get("sop_class_uid"):
                        sop = self._sop_class(str(_first(ds, "0020000D")), uid)
                        if sop not in IMAGE_SOP_CLASSES:
                            self._non_image[uid] = f"a series of {sop_class_name(sop) or 'unknown objects'}"
                            continue
                        new[uid] = {
                            "study_uid": str(_first(ds, "0020000D")), "modality": modality,
                            "description": str(_first(ds, "0008103E")), "patient_id": str(_first(ds, "00100020")),
                            "series_date": str(_first(ds, "00080021")), "series_number": _first(ds, "00200011", None),
                            "instances": _first(ds, "00201209", None), "sop_class_uid": sop,
                        }
                    listed.append(uid)
                self._register(new)
                self.pacs_state.update(reachable=True, error=None, checked=int(time.time()))
            except (requests.RequestException, OSError, ValueError, KeyError, IndexError) as e:
                why = f"{type(e).__name__}: {e}"
                if self.pacs_state.get("error") != why:
                    logger.warning(f"The PACS at {self.url} cannot be reached ({why}); serving the series known "
                                   "from before")
                self.pacs_state.update(reachable=False, error=why, checked=int(time.time()))
                self.sync()
                listed = sorted(k for k, v in self._datastore.objects.items() if v.image.info.get(PACS_KEY))
            self._listed, self._listed_at = sorted(listed), now
            return list(self._listed)

    def _register(self, new: Dict[str, Dict[str, Any]]) -> None:
        """Add newly listed image series to ``datastore_v2.json`` (nothing is fetched)."""
        if not new:
            return
        with FileLock(self._lock_file):
            self._reload_unlocked()
            for uid, pacs in new.items():
                obj = self._datastore.objects.get(uid)
                if obj is None:
                    info = {"ts": int(time.time()), "name": f"{uid}.nii.gz", PACS_KEY: pacs,
                            "SeriesInstanceUID": uid, "StudyInstanceUID": pacs["study_uid"],
                            "PatientID": pacs["patient_id"], "Modality": pacs["modality"]}
                    self._datastore.objects[uid] = ImageLabelModel(image=DataModel(info=info, ext=".nii.gz"))
                else:
                    obj.image.info[PACS_KEY] = {**(obj.image.info.get(PACS_KEY) or {}), **pacs}
            self._write_unlocked()
        logger.info(f"{len(new)} new image series listed by the PACS at {self.url}")

    def require_image(self, image_id: str) -> None:
        """404 for an id the PACS does not list as an image series; 422 for a listed series of non-image objects
        (a Segmentation, a Parametric Map ...)."""
        check_id(image_id)
        if image_id in self.list_images():
            return
        why = self._non_image.get(image_id)
        if why:
            raise unprocessable(f"series {image_id} is {why}, not an image series: only CT, MR, PET or NM image "
                                "series can be detected or curated")
        raise not_found(f"series {image_id!r} is not an image series of the PACS at {self.url}")

    def _require(self, image_id: str):
        self.require_image(image_id)
        return super()._require(image_id)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> Dict[str, Any]:
        self.require_image(image_id)  # registers a series listed since the last refresh
        return super().update_image_info(image_id, info)

    def json(self):
        """``GET /datastore/?output=all``: the listed series only (not those gone from the PACS)."""
        listed = set(self.list_images())
        d = super().json()
        d["objects"] = {k: v for k, v in d.get("objects", {}).items() if k in listed}
        return d

    def status(self) -> Dict[str, Any]:
        s = super().status()
        s["pacs"] = dict(self.pacs_state)
        return s

    def studies_by_state(self, state: Optional[str]) -> List[str]:
        listed = set(self.list_images())
        return [i for i in super().studies_by_state(state) if i in listed]

    # ------------------------------------------------------------------ fetching
    def series_folder(self, image_id: str) -> str:
        return os.path.join(self._dicom_root, image_id)

    def get_image_uri(self, image_id: str) -> str:
        """The series as a NIfTI file in the cache, fetched and converted when first asked for."""
        obj = self._require(image_id)
        path = os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz")
        if os.path.isfile(path):
            return path
        with FileLock(os.path.join(self._lock_root, f"{image_id}.lock")):
            if os.path.isfile(path):  # another process converted it meanwhile
                return path
            folder = self._fetch(image_id, (obj.image.info.get(PACS_KEY) or {}).get("study_uid"))
            self._convert(image_id, folder, path)
        return path

    def _fetch(self, image_id: str, study_uid: Optional[str]) -> str:
        from monailabel.datastore.utils.dicom import dicom_web_download_series
        from spmamba.io import VolumeError, inspect_dicom_series

        folder = self.series_folder(image_id)
        if not (os.path.isdir(folder) and os.listdir(folder)):
            partial = tempfile.mkdtemp(prefix=f".{image_id}.", dir=self._dicom_root)
            try:
                t0 = time.time()
                dicom_web_download_series(study_uid or None, image_id, partial, self._client)
                logger.info(f"Fetched series {image_id} ({len(os.listdir(partial))} files) in {time.time() - t0:.1f} s")
            except requests.HTTPError as e:
                shutil.rmtree(partial, ignore_errors=True)
                code = getattr(e.response, "status_code", None)
                if code == 404:
                    raise not_found(f"series {image_id} is no longer in the PACS at {self.url}") from e
                raise bad_gateway(f"the PACS at {self.url} did not deliver series {image_id} ({e})") from e
            except (requests.RequestException, OSError) as e:
                shutil.rmtree(partial, ignore_errors=True)
                raise bad_gateway(f"the PACS at {self.url} did not deliver series {image_id} "
                                  f"({type(e).__name__}: {e})") from e
            except Exception as e:  # noqa: BLE001 - e.g. an instance pydicom cannot decode
                shutil.rmtree(partial, ignore_errors=True)
                raise unprocessable(f"series {image_id}: its instances could not be read ({type(e).__name__}: "
                                    f"{e})") from e
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)  # complete: only now under its name
        try:
            inspect_dicom_series(folder, f"series {image_id}")
        except VolumeError as e:
            raise unprocessable(str(e)) from e
        return folder

    def _convert(self, image_id: str, folder: str, path: str) -> None:
        from monailabel.datastore.utils.convert import dicom_to_nifti

        from .detection import read_volume

        try:
            converted = dicom_to_nifti(folder)
        except Exception as e:  # noqa: BLE001 - SimpleITK's reader on damaged data
            raise unprocessable(f"series {image_id}: its voxel data could not be read ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        try:
            volume = read_volume(converted, f"series {image_id}")  # the library's checks (NaN, size ...), a 422
            from spmamba.atomic import atomic_path

            with atomic_path(path, suffix=".nii.gz") as tmp:
                shutil.copyfile(converted, tmp)
        finally:
            os.unlink(converted)
        with FileLock(self._lock_file):
            self._reload_unlocked()
            obj = self._datastore.objects.get(image_id)
            if obj is not None:  # merge: the curation and scores made before the fetch stay
                obj.image.info["fetched_ts"] = int(time.time())
                obj.image.info["shape"] = [int(s) for s in volume.array.shape]
                self._write_unlocked()

    def source_headers(self, image_id: str) -> list:
        """The pydicom headers (no pixel data) of the series' cached instances (fetched if needed)."""
        import pydicom

        self.get_image_uri(image_id)
        folder = self.series_folder(image_id)
        return [pydicom.dcmread(os.path.join(folder, f), stop_before_pixels=True)
                for f in sorted(os.listdir(folder)) if not f.startswith(".")]

    def store(self, datasets: list) -> None:
        """STOW-RS ``datasets`` (pydicom) into the PACS."""
        self._client.store_instances(datasets)

    # ------------------------------------------------------------------ what the PACS owns
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        raise conflict(f"the studies come from the PACS at {self.url}: store new series there (this app lists them "
                       "within seconds); to detect a file without adding it, upload it with POST /infer")

    def remove_image(self, image_id: str) -> None:
        raise conflict(f"the studies come from the PACS at {self.url}: delete the series there, or mark it "
                       f"'excluded' (info.{CURATION_KEY})")

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return [i for i in super().get_labeled_images(label_tag, labels) if i in set(self.list_images())]

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        labeled = set(super().get_labeled_images(label_tag, labels))
        return [i for i in self.list_images() if i not in labeled]


def store_results(datastore: PacsDatastore, image_id: str, volume, result, detector) -> Dict[str, Any]:
    """Store the detection of series ``image_id`` in the PACS: the heatmap as a Parametric Map and the abnormal
    voxels as a Segmentation, both referencing the series. Returns what was stored (series and instance UIDs of
    each) or, when the PACS refused, ``{"stored": False, "error": ...}``; never raises for the PACS's failures."""
    from spmamba.dicom_results import DicomResultError, parametric_map, segmentation
    from spmamba.scoring import abnormal_voxels

    t0 = time.perf_counter()
    try:
        sources = datastore.source_headers(image_id)
        common = {"model_version": detector.version, "method": detector.method_name}
        pm = parametric_map(result.heatmap, volume.affine, sources, pixel_threshold=float(result.pixel_threshold),
                            **common)
        seg = segmentation(abnormal_voxels(result.heatmap, result.pixel_threshold), volume.affine, sources, **common)
    except DicomResultError as e:
        return {"stored": False, "error": f"not written as DICOM: {e}"}
    try:
        datastore.store([pm, seg])
    except (requests.RequestException, OSError, ValueError) as e:
        logger.warning(f"Storing the results of {image_id} in {datastore.url} failed: {e}")
        return {"stored": False, "error": f"the PACS at {datastore.url} refused the results ({type(e).__name__}: {e})"}
    out = {"stored": True, "url": datastore.url, "study_uid": str(pm.StudyInstanceUID),
           "seconds": round(time.perf_counter() - t0, 3)}
    for key, ds in (("parametric_map", pm), ("segmentation", seg)):
        out[key] = {"series_uid": str(ds.SeriesInstanceUID), "sop_instance_uid": str(ds.SOPInstanceUID),
                    "series_description": str(ds.SeriesDescription)}
    logger.info(f"Stored the anomaly map and regions of {image_id} in {datastore.url}: "
                f"{out['parametric_map']['series_uid']}, {out['segmentation']['series_uid']}")
    return out
