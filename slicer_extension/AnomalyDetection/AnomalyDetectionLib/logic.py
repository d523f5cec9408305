"""The module's Logic without Qt: MRML work (heatmap overlay, regions, slice jumps) and server calls.

Imports only numpy, vtk, ``slicer`` (MRML, module logics, ``slicer.util``) and the stdlib client, so it runs inside
Slicer and headless with ``slicer-core`` from PyPI.  Methods fall in two groups:

* **MRML methods** (``load_volume``, ``show_heatmap``, ``set_threshold``, ``make_regions``, ``jump_to`` ...) touch the
  scene and must run on Slicer's main thread;
* **remote methods** (``run_detection``, ``fetch_next_case``, ``training_progress`` ...) only talk to the server and
  write files, so the Widget runs them in a worker thread (``TaskRunner``) and feeds their results to the MRML
  methods when they finish.

The module's state (server URL, method, threshold, opacity, smallest region, input volume, heatmap) lives in a
parameter node, a ``vtkMRMLScriptedModuleNode`` singleton of the scene (``getParameterNode``), as in Slicer's
scripted-module template: it is saved with the scene, restored when the scene is loaded, and scriptable
(``SetParameter`` + ``apply_parameters``).

One rule says which voxels are anomalous: ``heatmap >= threshold`` (at or above), compared in the heatmap's own type
as numpy does when it compares a float32 map with a Python float; the library's rule
(``spmamba.scoring.abnormal_voxels``, used by ``find_regions`` and the app's ``spmamba_seg`` label).  The overlay
shows exactly those voxels (every voxel below the threshold is transparent) and the regions are made of them.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk

from .client import (
    ACTIVE_TRAIN_STATES,
    CURATION_STATES,
    DEFAULT_MODEL,
    AnomalyClient,
    DetectionResult,
    ServerError,
    ServerSummary,
    describe_version,
    normalize_url,
    summarize_info,
    train_progress,
)

#: Heat colour maps, best first.  All are built into the MRML colour logic (no colour file needed), so they exist in
#: every Slicer build, including slicer-core.
HEAT_COLOR_NODE_IDS = (
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeIron",
    "vtkMRMLColorTableNodeRainbow",
)

ATTR_IMAGE_ID = "AnomalyDetection.ImageId"  # datastore id of the study a volume came from / was uploaded as
ATTR_REFERENCE_ID = "AnomalyDetection.ReferenceNodeID"  # on heatmap / regions nodes: the volume they belong to
ATTR_ROLE = "AnomalyDetection.Role"  # "heatmap", "regions", "regionsTable"

ATTR_SERVER_REGIONS = "AnomalyDetection.serverRegions"  # on a heatmap: the server's regions (JSON), if it sent any

#: The module's parameter node: a vtkMRMLScriptedModuleNode singleton (tag = module name) saved with the scene.
MODULE_NAME = "AnomalyDetection"
PARAM_SERVER_URL = "ServerURL"
PARAM_METHOD = "Method"  # infer task that makes the heatmap ("spmamba", ...)
PARAM_THRESHOLD = "Threshold"  # display / regions threshold of the current heatmap ('' before the first one)
PARAM_OPACITY = "Opacity"
PARAM_MIN_REGION_VOXELS = "MinRegionVoxels"
REF_INPUT_VOLUME = "InputVolume"
REF_HEATMAP = "Heatmap"
DEFAULT_OPACITY = 0.5
#: 2-D image files the server reads as volumes with one slice (``spmamba.io.IMAGE_SUFFIXES``)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")

REGION_COLORS = (
    (0.95, 0.2, 0.15), (0.2, 0.6, 1.0), (0.3, 0.85, 0.3), (1.0, 0.8, 0.1), (0.8, 0.3, 0.9),
    (0.1, 0.9, 0.9), (1.0, 0.5, 0.0), (0.6, 0.6, 0.6),
)


@dataclass
class Region:
    """One connected region of the thresholded heatmap (label 1 = highest peak)."""

    label: int
    n_voxels: int
    volume_mm3: float
    peak: float
    mean: float
    centroid_ijk: Tuple[float, float, float]
    centroid_ras: Tuple[float, float, float]
    source: str = "heatmap"  # "server": the row is the server's (infer JSON "regions"); "heatmap": computed here


@dataclass
class ModuleParameters:
    """The parameter node read into Python values (see ``AnomalyLogic.parameters``)."""

    server_url: str
    method: str
    threshold: Optional[float]
    opacity: float
    min_region_voxels: int
    input_volume: Any = None
    heatmap: Any = None


@dataclass
class DetectionJob:
    """What ``prepare_detection`` (main thread) hands to ``run_detection`` (worker thread)."""

    reference_id: str
    image_id: Optional[str]
    file_path: Optional[str]
    add_to_studies: bool
    upload_name: str
    method: str = ""  # the infer task to run (the Logic's method when the job was prepared)
    series_uid: Optional[str] = None  # a volume from Slicer's DICOM database: its SeriesInstanceUID
    store_results: bool = False  # PACS studies: store the heatmap and regions in the PACS (Parametric Map, SEG)
    note: str = ""  # what run_detection did differently from what was asked (set by the worker)
    # a PACS series: the volume written on the main thread too, sent as a file if the server's PACS lacks the series
    # (MRML is not thread-safe: the worker must not read the scene)
    fallback_path: Optional[str] = None


@dataclass
class TrainingProgress:
    """One poll of the server while training: for the progress bar and the model-version label. ``running``: the
    task is submitted or running (``ACTIVE_TRAIN_STATES``)."""

    running: bool
    percent: Optional[int]
    text: str
    status: str
    model_version: str
    summary: ServerSummary
    warning: str = ""  # e.g. a weaker preset than the model it replaces (train_stats["warning"])


@dataclass
class NextCase:
    """What "Next suspicious case" found: a downloaded study, or why there is none to load now."""

    image_id: Optional[str]
    path: Optional[str]
    pending: int = 0  # studies the server is still scoring in the background
    message: str = ""

    def status_text(self) -> str:
        """The status line when nothing was loaded."""
        if self.pending:
            return self.message or (f"{self.pending} studies are still being scored on the server; "
                                    "ask again in a minute.")
        return "No case left for this strategy: every study is reviewed."


@dataclass
class ModelVersions:
    """The versions the server keeps, for the Retrain section's combo box (newest first)."""

    current: str
    versions: List[Dict[str, Any]]
    labels: List[str]
    supported: bool = True
    keep: int = 0  # the server's keep_versions

    def index_of(self, version: str) -> int:
        for i, entry in enumerate(self.versions):
            if entry.get("version") == version:
                return i
        return -1


class AnomalyLogic:
    """Heatmap overlay, regions, curation and training, for one server URL.

    :param server_url: MONAI Label server (default of a new scene's parameter node; the Widget passes the URL it
        remembers in the application settings)
    :param model: the anomaly method, i.e. the app's infer task that returns the heatmap (``spmamba``)
    """

    def __init__(self, server_url: str = "http://127.0.0.1:8000", model: str = DEFAULT_MODEL, timeout: float = 10.0):
        self._method = model or DEFAULT_MODEL
        self.timeout = timeout
        self.client = AnomalyClient(server_url, timeout=timeout)
        # scans written for upload, downloaded studies and heatmaps pass through here: each is removed as soon as it
        # is in the scene or sent (``discard``), the folder itself by ``close`` or, at the latest, when Python exits
        self.work_dir = tempfile.mkdtemp(prefix="AnomalyDetection_")
        self._remove_work_dir = weakref.finalize(self, shutil.rmtree, self.work_dir, True)
        self.summary: Optional[ServerSummary] = None  # the last GET /info/ (Connect)
        self.regions_source = ""  # how the last make_regions made its rows: "server", "server+heatmap", "heatmap"
        self.regions_note = ""  # why the server's regions were not used ('' when they were, or there were none)
        # a server on a PACS: store each detection of a PACS series there too (a Parametric Map and a Segmentation
        # referencing the series); the server's own pacs_results setting stores them whatever this says
        self.store_in_pacs = False

    # ============================================================================================ files
    def discard(self, path: Optional[str]) -> None:
        """Remove a file this logic wrote or downloaded (the temporary folder holding it, directly under
        ``work_dir``) once it is loaded into the scene or sent: patient images must not pile up on disk. Paths
        elsewhere are left alone."""
        if not path:
            return
        root = os.path.abspath(self.work_dir)
        target = os.path.abspath(path)
        if target == root or os.path.commonpath([target, root]) != root:
            return
        shutil.rmtree(os.path.join(root, os.path.relpath(target, root).split(os.sep)[0]), ignore_errors=True)

    def close(self) -> None:
        """Remove ``work_dir`` and everything left in it (the module's cleanup calls this)."""
        self._remove_work_dir()

    # ============================================================================================ settings
    @property
    def scene(self) -> "slicer.vtkMRMLScene":
        return slicer.mrmlScene

    def set_server_url(self, url: str) -> None:
        """(main) Talk to ``url`` from now on; remembered in the parameter node."""
        if normalize_url(url) != getattr(getattr(self, "client", None), "url", None):
            self.client = AnomalyClient(url, timeout=self.timeout)
        self._write_parameter(PARAM_SERVER_URL, self.client.url)

    @property
    def server_url(self) -> str:
        return self.client.url

    @property
    def method(self) -> str:
        """The anomaly method: the app's infer task run by Detect (``POST /infer/{method}``)."""
        return self._method

    def set_method(self, method: str) -> None:
        """(main) Run ``method`` from now on; remembered in the parameter node."""
        if method:
            self._method = str(method)
            self._write_parameter(PARAM_METHOD, self._method)

    # ``model`` is the older name of ``method`` (the infer task); kept for scripts.
    model = property(lambda self: self._method, lambda self, value: self.set_method(value))

    @property
    def train_task(self) -> str:
        """The trainer for the current method (see ``ServerSummary.train_task``); the method itself before Connect."""
        return self.summary.train_task(self._method) if self.summary is not None else self._method

    # ============================================================================================ parameter node
    def getParameterNode(self):
        """(main) The module's parameter node in the current scene, created with defaults when missing.

        A ``vtkMRMLScriptedModuleNode`` singleton (tag ``AnomalyDetection``), as Slicer's scripted-module template
        makes: saved with the scene (.mrml / .mrb) and restored when the scene is loaded. Parameters (strings):
        ``ServerURL``, ``Method``, ``Threshold``, ``Opacity``, ``MinRegionVoxels``; node references ``InputVolume``
        and ``Heatmap``.
        """
        node = self.scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = self.scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # the scene holds the reference
            node.SetSingletonTag(MODULE_NAME)
            node.SetModuleName(MODULE_NAME)
            node.SetName(MODULE_NAME)
            self.setDefaultParameters(node)
            node = self.scene.AddNode(node)
        else:
            self.setDefaultParameters(node)  # a node reset by a scene close, or saved by an older module
        return node

    def setDefaultParameters(self, node) -> None:
        """Fill the parameters that are missing (never overwrites a value)."""
        defaults = ((PARAM_SERVER_URL, self.server_url), (PARAM_METHOD, self._method),
                    (PARAM_OPACITY, repr(DEFAULT_OPACITY)), (PARAM_MIN_REGION_VOXELS, "1"))
        missing = [(k, v) for k, v in defaults if not node.GetParameter(k)]
        if missing:
            was = node.StartModify()
            for key, value in missing:
                node.SetParameter(key, value)
            node.EndModify(was)

    def parameters(self) -> ModuleParameters:
        """(main) The parameter node's values."""
        node = self.getParameterNode()
        return ModuleParameters(
            server_url=node.GetParameter(PARAM_SERVER_URL) or self.server_url,
            method=node.GetParameter(PARAM_METHOD) or self._method,
            threshold=_to_float(node.GetParameter(PARAM_THRESHOLD), None),
            opacity=_to_float(node.GetParameter(PARAM_OPACITY), DEFAULT_OPACITY),
            min_region_voxels=max(1, int(_to_float(node.GetParameter(PARAM_MIN_REGION_VOXELS), 1))),
            input_volume=node.GetNodeReference(REF_INPUT_VOLUME),
            heatmap=node.GetNodeReference(REF_HEATMAP),
        )

    def set_parameters(self, **values: Any) -> None:
        """(main) Write several parameters at once (one Modified event): ``server_url``, ``method``, ``threshold``,
        ``opacity``, ``min_region_voxels``, ``input_volume`` / ``heatmap`` (a node or None). Scripts call
        ``apply_parameters`` afterwards (the module's panel does it when the node changes)."""
        keys = {"server_url": PARAM_SERVER_URL, "method": PARAM_METHOD, "threshold": PARAM_THRESHOLD,
                "opacity": PARAM_OPACITY, "min_region_voxels": PARAM_MIN_REGION_VOXELS}
        refs = {"input_volume": REF_INPUT_VOLUME, "heatmap": REF_HEATMAP}
        unknown = set(values) - set(keys) - set(refs)
        if unknown:
            raise TypeError(f"unknown parameters {sorted(unknown)}")
        node = self.getParameterNode()
        was = node.StartModify()
        try:
            for name, value in values.items():
                if name in refs:
                    node.SetNodeReferenceID(refs[name], value.GetID() if value is not None else None)
                elif name == "server_url":
                    node.SetParameter(keys[name], normalize_url(str(value)))
                elif name in ("threshold", "opacity"):
                    node.SetParameter(keys[name], "" if value is None else repr(float(value)))
                elif name == "min_region_voxels":
                    node.SetParameter(keys[name], str(max(1, int(value))))
                else:
                    node.SetParameter(keys[name], str(value))
        finally:
            node.EndModify(was)

    def apply_parameters(self) -> ModuleParameters:
        """(main) Make the module follow its parameter node: server URL and method for the next calls, threshold
        on the heatmap's display, opacity in the slice views. Run after a scene load or after a script changed the
        node (the panel runs it whenever the node changes)."""
        p = self.parameters()
        if normalize_url(p.server_url) != self.client.url:
            self.client = AnomalyClient(p.server_url, timeout=self.timeout)
        if p.method:
            self._method = p.method
        heat = p.heatmap
        if heat is not None and heat.GetImageData() is not None and heat.GetDisplayNode() is not None:
            if p.threshold is not None:
                self.set_threshold(heat, p.threshold)
        self.set_opacity(p.opacity)
        return p

    def _write_parameter(self, name: str, value: str) -> None:
        if getattr(slicer, "mrmlScene", None) is None:
            return
        self.getParameterNode().SetParameter(name, value)

    # ============================================================================================ remote: info
    def connect(self) -> ServerSummary:
        """(worker) ``GET /info/`` -> methods (infer tasks that return a heatmap), model versions, strategies,
        trainers, training state. Remembered for ``train_task``."""
        summary = summarize_info(self.client.info())
        self.summary = summary
        return summary

    # ============================================================================================ MRML: volumes
    def load_volume(self, path: str, name: Optional[str] = None, image_id: Optional[str] = None):
        """(main) Read a .nii/.nii.gz/.nrrd file, or a 2-D .png/.jpg/.dcm image (a volume with one slice, see
        ``image_as_nrrd``), into a new scalar volume node through a storage node. A file in ``work_dir`` (a
        download, a heatmap) is removed once read, whether or not reading succeeded."""
        original = path
        try:
            return self._load_volume(path, name, image_id)
        finally:
            self.discard(original)

    def _load_volume(self, path: str, name: Optional[str], image_id: Optional[str]):
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or _stem(path))
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        if path.lower().endswith(IMAGE_SUFFIXES):
            try:
                path = image_as_nrrd(path, tempfile.mkdtemp(dir=self.work_dir))
            except Exception as e:  # noqa: BLE001 (SimpleITK raises RuntimeError; anything else is the same)
                self.scene.RemoveNode(node)
                self.scene.RemoveNode(storage)
                raise ServerError(f"Could not read the image file {path} ({str(e).strip().splitlines()[-1][:200]}).",
                                  kind="bad_response") from e
        storage.SetFileName(path)
        storage.SetSingleFile(True)
        try:
            read = storage.ReadData(node)
        finally:
            self.discard(path)  # an image converted to .nrrd in work_dir
        if not read:
            self.scene.RemoveNode(node)
            self.scene.RemoveNode(storage)
            raise ServerError(f"Could not read the volume file {path} (not an image, or truncated).",
                              kind="bad_response")
        node.SetAndObserveStorageNodeID(storage.GetID())
        node.CreateDefaultDisplayNodes()
        if image_id:
            node.SetAttribute(ATTR_IMAGE_ID, image_id)
        return node

    def write_volume(self, node, path: str, compress: bool = True) -> str:
        """(main) Write a volume node to ``path`` (.nrrd or .nii.gz) without changing its storage node."""
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(path)
            storage.SetUseCompression(compress)
            if not storage.WriteData(node):
                raise ServerError(f"Could not write {node.GetName()} to {path}.", kind="bad_request")
        finally:
            self.scene.RemoveNode(storage)
        return path

    @staticmethod
    def image_id_of(node) -> Optional[str]:
        return node.GetAttribute(ATTR_IMAGE_ID) if node is not None else None

    @staticmethod
    def dicom_series_uid(node) -> Optional[str]:
        """The SeriesInstanceUID of a volume loaded from Slicer's DICOM database (its subject hierarchy item's
        ``DICOM`` UID, which Slicer's DICOM plugins set), else None."""
        if node is None:
            return None
        scene = node.GetScene() or slicer.mrmlScene
        sh = scene.GetSubjectHierarchyNode() if scene is not None else None
        if sh is None:
            return None
        item = sh.GetItemByDataNode(node)
        uid = sh.GetItemUID(item, "DICOM") if item else ""
        return uid or None

    def study_id(self, node) -> Optional[str]:
        """The server's id for ``node``: the one it was loaded or uploaded as, else (a server on a PACS) the
        SeriesInstanceUID of a volume from Slicer's DICOM database."""
        image_id = self.image_id_of(node)
        if image_id:
            return image_id
        if self.summary is not None and self.summary.pacs:
            return self.dicom_series_uid(node)
        return None

    # ============================================================================================ sign-in
    def sign_in(self, user: str, password: str, remember: bool = True) -> bool:
        """(worker) Sign in to the server; with ``remember`` the password goes to the system keyring when there is
        one (:mod:`.credentials`). Returns whether the password was stored."""
        from . import credentials

        self.client.login(user, password)
        if remember:
            return credentials.save_password(self.client.url, user, password)
        credentials.forget_password(self.client.url, user)
        return False

    def sign_in_remembered(self, user: str) -> bool:
        """(worker) Sign in with the password the keyring holds for ``user`` at this server; False when it holds
        none (ask the user)."""
        from . import credentials

        password = credentials.load_password(self.client.url, user)
        if not password:
            return False
        self.client.login(user, password)
        return True

    def sign_in_and_connect(self, user: str, password: str, remember: bool = True) -> Tuple[bool, ServerSummary]:
        """(worker) Sign in (with ``password``, or the keyring's when it is empty), then Connect. Returns (whether
        the password is in the keyring, the server summary)."""
        if password:
            stored = self.sign_in(user, password, remember)
        elif self.sign_in_remembered(user):
            stored = True
        else:
            raise ServerError("Enter your password: none is remembered for this server.", kind="auth")
        return stored, self.connect()

    def connect_signed_in(self, user: str = "") -> ServerSummary:
        """(worker) Connect; when the server asks for sign-in and the keyring holds ``user``'s password for it, sign
        in with it and connect again."""
        try:
            return self.connect()
        except ServerError as e:
            if e.kind == "auth" and user and self.sign_in_remembered(user):
                return self.connect()
            raise

    def sign_out(self, forget: bool = False) -> None:
        from . import credentials

        if forget and self.client.username:
            credentials.forget_password(self.client.url, self.client.username)
        self.client.logout()

    # ============================================================================================ detect
    def prepare_detection(self, volume, add_to_studies: bool = True) -> DetectionJob:
        """(main) Decide how to send ``volume``: by its datastore id, or as a file written now."""
        if volume is None:
            raise ValueError("Select an input volume first.")
        if volume.IsA("vtkMRMLLabelMapVolumeNode") or not volume.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError(f"{volume.GetName()} is not a grey-level scalar volume (a label map, a colour or a "
                             "multi-volume): select an image")
        if volume.GetImageData() is None:
            raise ValueError(f"{volume.GetName()} has no voxels loaded")
        image_id = self.image_id_of(volume)
        series_uid = self.dicom_series_uid(volume)
        pacs = self.summary is not None and self.summary.pacs
        file_path = None
        if not image_id and not (pacs and series_uid):
            # a volume from a file or from Slicer's DICOM database (its storage node, if any, is left alone; a
            # parent transform, e.g. DICOM's acquisition transform, is not applied: the heatmap comes back on the
            # same voxel grid and is shown under the same transform)
            safe = _safe_id(volume.GetName())
            file_path = self.write_volume(volume, os.path.join(tempfile.mkdtemp(dir=self.work_dir), safe + ".nrrd"))
        fallback_path = None
        if not image_id and file_path is None:  # a PACS series, sent by its UID; the file only if the PACS lacks it
            # uncompressed: a fraction of a second on the main thread, for a file that is rarely sent
            fallback_path = self.write_volume(volume, os.path.join(tempfile.mkdtemp(dir=self.work_dir),
                                                                   _safe_id(volume.GetName()) + ".nrrd"),
                                              compress=False)
        return DetectionJob(volume.GetID(), image_id, file_path, add_to_studies and not pacs,
                            _safe_id(volume.GetName()), method=self._method, series_uid=series_uid,
                            store_results=bool(pacs and self.store_in_pacs), fallback_path=fallback_path)

    def run_detection(self, job: DetectionJob) -> DetectionResult:
        """(worker) Upload the volume if needed, run ``POST /infer/{model}`` and download the heatmap (into
        ``work_dir``; ``show_heatmap`` removes it once loaded). The copy of the volume written for the upload is
        removed when this returns; on failure the download folder too."""
        out_dir = tempfile.mkdtemp(dir=self.work_dir)
        try:
            return self._run_detection(job, out_dir)
        except BaseException:
            self.discard(out_dir)
            raise
        finally:
            self.discard(job.file_path)
            self.discard(job.fallback_path)

    def _run_detection(self, job: DetectionJob, out_dir: str) -> DetectionResult:
        image_id = job.image_id
        method = job.method or self._method
        params = {"store_results": True} if job.store_results else None
        if not image_id and job.series_uid and not job.file_path:  # a PACS series opened from Slicer's DICOM browser
            try:
                result = self.client.detect(image_id=job.series_uid, model=method, out_dir=out_dir, params=params)
                result.image_id = job.series_uid
                return result
            except ServerError as e:
                if e.kind != "not_found":
                    raise
                if not job.fallback_path:
                    raise
                job.note = "This series is not in the server's PACS: detected as a file, not added to the studies."
                job.file_path, job.fallback_path = job.fallback_path, None
        if not image_id and job.add_to_studies:
            image_id = self.client.upload_image(job.file_path, image_id=job.upload_name)
        if image_id:
            result = self.client.detect(image_id=image_id, model=method, out_dir=out_dir, params=params)
        else:
            result = self.client.detect(file_path=job.file_path, model=method, out_dir=out_dir)
        result.image_id = image_id
        return result

    def heat_color_node_id(self) -> str:
        """The first heat colour map present in the scene (PET-Heat; Iron and Rainbow as fall-backs)."""
        for node_id in HEAT_COLOR_NODE_IDS:
            if self.scene.GetNodeByID(node_id) is not None:
                return node_id
        colors = slicer.vtkMRMLColorLogic()  # adds the built-in colour nodes to a scene that lacks them
        colors.SetMRMLScene(self.scene)
        colors.SetMRMLScene(None)
        for node_id in HEAT_COLOR_NODE_IDS:
            if self.scene.GetNodeByID(node_id) is not None:
                return node_id
        raise RuntimeError("No heat colour map found in the scene")

    def find_heatmap(self, reference):
        """The heatmap node shown for ``reference``, or None."""
        return self._find_by_role(reference, "heatmap")

    def show_heatmap(
        self,
        reference,
        heatmap_path: str,
        threshold: Optional[float] = None,
        opacity: Optional[float] = None,
        result: Optional[DetectionResult] = None,
    ):
        """(main) Load ``heatmap_path`` as the foreground overlay of ``reference`` with a heat colour map.

        The heatmap must be on the reference's voxel grid; when it is (within 1e-3 mm) its geometry is copied
        exactly from the reference so the overlay cannot drift.  At or below ``threshold`` (default: the result's
        calibrated pixel threshold, else the 99th percentile) voxels are transparent; window/level spans
        threshold..max.  ``opacity`` defaults to the parameter node's.  Replaces an earlier heatmap of the same
        reference.  The server's regions (``result.regions``) are kept on the heatmap node for ``make_regions``.
        The parameter node then names this input volume and heatmap, with the threshold and opacity used.
        """
        old = self.find_heatmap(reference)
        if old is not None:
            self.remove_regions(reference)
            self.scene.RemoveNode(old)
        heat = self.load_volume(heatmap_path, name=f"{reference.GetName()} anomaly")
        heat.SetAttribute(ATTR_REFERENCE_ID, reference.GetID())
        heat.SetAttribute(ATTR_ROLE, "heatmap")
        self.geometry_warning = self._snap_to_reference(heat, reference)
        if threshold is None and result is not None:
            threshold = result.pixel_threshold
        if threshold is None:
            threshold = self.default_threshold(heat)
        if result is not None:
            for key, value in (("score", result.score), ("threshold", result.threshold),
                               ("pixel_threshold", result.pixel_threshold), ("verdict", result.verdict),
                               ("model_version", result.model_version), ("alignment", result.alignment_text)):
                if value not in (None, ""):
                    heat.SetAttribute(f"AnomalyDetection.{key}", str(value))
            if result.regions is not None and result.pixel_threshold is not None:
                heat.SetAttribute(ATTR_SERVER_REGIONS, json.dumps({
                    "pixel_threshold": result.pixel_threshold, "n_regions": result.n_regions,
                    "regions": result.regions}))
            if result.image_id and not self.image_id_of(reference):
                reference.SetAttribute(ATTR_IMAGE_ID, result.image_id)
        if opacity is None:
            opacity = self.parameters().opacity
        display = heat.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.heat_color_node_id())
        display.SetInterpolate(True)
        self.set_parameters(input_volume=reference, heatmap=heat, threshold=float(threshold), opacity=opacity)
        self.set_threshold(heat, threshold)
        slicer.util.setSliceViewerLayers(background=reference, foreground=heat, foregroundOpacity=float(opacity))
        return heat

    def heatmap_range(self, heat) -> Tuple[float, float]:
        lo, hi = heat.GetImageData().GetScalarRange()
        return float(lo), float(hi)

    def default_threshold(self, heat) -> float:
        arr = slicer.util.arrayFromVolume(heat)
        return float(np.percentile(arr, 99.0)) if arr.size else 0.0

    def set_threshold(self, heat, threshold: float) -> None:
        """(main) Voxels below ``threshold`` become transparent (the module's rule: anomalous = ``heatmap >=
        threshold``, see :func:`at_or_above`); colours span threshold..max.  The parameter node follows when ``heat``
        is its heatmap."""
        lo, hi = self.heatmap_range(heat)
        threshold = float(threshold)
        top = max(hi, threshold + 1e-6)
        # the display shows lower <= v <= upper, compared in the heatmap's own type: lower = the threshold in that type
        lower = display_lower_bound(threshold, _scalar_dtype(heat))
        display = heat.GetDisplayNode()
        with slicer.util.NodeModify(display):
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(threshold, top)
            display.AutoThresholdOff()
            display.SetApplyThreshold(True)
            display.SetThreshold(lower, max(top + abs(top) * 1e-3 + 1e-6, lower))
        heat.SetAttribute("AnomalyDetection.displayThreshold", repr(threshold))
        node = self.scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode") if self.scene is not None else None
        if node is not None and node.GetNodeReferenceID(REF_HEATMAP) == heat.GetID():
            node.SetParameter(PARAM_THRESHOLD, repr(threshold))

    def set_opacity(self, opacity: float) -> None:
        """(main) Foreground (heatmap) opacity in every slice view; the parameter node follows."""
        slicer.util.setSliceViewerLayers(foregroundOpacity=float(opacity))
        self._write_parameter(PARAM_OPACITY, repr(float(opacity)))

    def _snap_to_reference(self, heat, reference) -> str:
        """Copy the reference's geometry onto ``heat`` when both share the grid; return a warning otherwise."""
        hdims = heat.GetImageData().GetDimensions()
        rdims = reference.GetImageData().GetDimensions() if reference.GetImageData() else None
        if rdims is None or tuple(hdims) != tuple(rdims):
            return (f"The heatmap grid {tuple(hdims)} differs from the input volume's {rdims}; it is shown at its "
                    "own position.")
        hm, rm = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        heat.GetIJKToRASMatrix(hm)
        reference.GetIJKToRASMatrix(rm)
        diff = np.abs(slicer.util.arrayFromVTKMatrix(hm) - slicer.util.arrayFromVTKMatrix(rm)).max()
        if diff > 1e-3:
            return (f"The heatmap's position differs from the input volume's by up to {diff:.3g} mm; it is shown "
                    "at its own position.")
        heat.SetIJKToRASMatrix(rm)
        if reference.GetParentTransformNode() is not None:
            heat.SetAndObserveTransformNodeID(reference.GetParentTransformNode().GetID())
        return ""

    # ============================================================================================ regions
    def compute_regions(self, heat, threshold: float, min_voxels: int = 1) -> Tuple[np.ndarray, List[Region]]:
        """(main) Connected regions (26-neighbourhood) of ``heatmap >= threshold`` (:func:`at_or_above`, the
        library's rule) with at least ``min_voxels``.

        Returns a label array shaped like ``arrayFromVolume(heat)`` (K, J, I), labels 1..N ordered by peak
        (highest first), and one :class:`Region` per label.
        """
        from vtk.util import numpy_support

        arr = slicer.util.arrayFromVolume(heat)
        mask = np.ascontiguousarray(at_or_above(arr, threshold).astype(np.uint8))
        image = vtk.vtkImageData()
        image.CopyStructure(heat.GetImageData())
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.ravel(), deep=True))
        conn = vtk.vtkImageConnectivityFilter()
        conn.SetInputData(image)
        conn.SetScalarRange(1.0, 1.0)
        conn.SetExtractionModeToAllRegions()
        conn.SetLabelModeToSizeRank()
        conn.SetLabelScalarTypeToInt()
        conn.SetSizeRange(max(1, int(min_voxels)), 2 ** 62)
        conn.Update()
        out = conn.GetOutput()
        labels = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(arr.shape).astype(np.int32)
        n = int(labels.max()) if labels.size else 0
        if n == 0:
            return np.zeros(arr.shape, np.int32), []
        flat_l = labels.ravel()
        flat_v = arr.ravel().astype(np.float64)
        counts = np.bincount(flat_l, minlength=n + 1)
        sums = np.bincount(flat_l, weights=flat_v, minlength=n + 1)
        peaks = np.full(n + 1, -np.inf)
        np.maximum.at(peaks, flat_l, flat_v)
        kk, jj, ii = np.indices(arr.shape, dtype=np.float64)
        cent = np.stack([np.bincount(flat_l, weights=c.ravel(), minlength=n + 1) for c in (ii, jj, kk)], axis=1)
        ijk_to_ras = vtk.vtkMatrix4x4()
        heat.GetIJKToRASMatrix(ijk_to_ras)
        m = slicer.util.arrayFromVTKMatrix(ijk_to_ras)
        voxel_mm3 = abs(float(np.linalg.det(m[:3, :3])))
        order = sorted(range(1, n + 1), key=lambda lab: -peaks[lab])
        remap = np.zeros(n + 1, np.int32)
        regions: List[Region] = []
        for new, old in enumerate(order, start=1):
            remap[old] = new
            c_ijk = cent[old] / counts[old]
            c_ras = (m @ np.append(c_ijk, 1.0))[:3]
            regions.append(Region(
                label=new, n_voxels=int(counts[old]), volume_mm3=float(counts[old] * voxel_mm3),
                peak=float(peaks[old]), mean=float(sums[old] / counts[old]),
                centroid_ijk=tuple(float(x) for x in c_ijk), centroid_ras=tuple(float(x) for x in c_ras),
            ))
        return remap[labels], regions

    def make_regions(self, heat, threshold: Optional[float] = None, min_voxels: int = 1):
        """(main) Thresholded heatmap -> a Segmentation (one segment per region) and a table of regions.

        ``threshold`` defaults to the heatmap's display threshold.  The segments are always made from the heatmap's
        voxels above the threshold.  When the server sent its regions with the heatmap and ``threshold`` is its
        ``pixel_threshold`` (the same after rounding to the heatmap's type), the table rows (voxels, volume, peak,
        mean, centroids) are the server's, each matched to its segment (``Region.source == "server"``; regions the
        server left out of its ``top_regions`` list are computed here).  Otherwise, or when the server's regions do
        not match the heatmap, everything is computed from the heatmap (``regions_note`` says why).

        Returns ``(segmentation_node, table_node, regions)``; replaces earlier regions of the same reference.
        """
        if threshold is None:
            threshold = float(heat.GetAttribute("AnomalyDetection.displayThreshold") or self.default_threshold(heat))
        reference = self.scene.GetNodeByID(heat.GetAttribute(ATTR_REFERENCE_ID) or "") or heat
        self.remove_regions(reference)
        labels, regions = self.compute_regions(heat, threshold, min_voxels)
        labels, regions = self._use_server_regions(heat, labels, regions, float(threshold), min_voxels)
        base = reference.GetName()

        seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{base} anomaly regions")
        seg.SetAttribute(ATTR_REFERENCE_ID, reference.GetID())
        seg.SetAttribute(ATTR_ROLE, "regions")
        seg.CreateDefaultDisplayNodes()
        if reference is not heat:
            seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        if regions:
            labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "anomaly-regions-tmp")
            m = vtk.vtkMatrix4x4()
            heat.GetIJKToRASMatrix(m)
            labelmap.SetIJKToRASMatrix(m)
            slicer.util.updateVolumeFromArray(labelmap, labels.astype(np.int16))
            if heat.GetParentTransformNode() is not None:
                labelmap.SetAndObserveTransformNodeID(heat.GetParentTransformNode().GetID())
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg)
            self.scene.RemoveNode(labelmap)
            if not ok:
                raise RuntimeError("Could not convert the thresholded heatmap to a segmentation")
            segmentation = seg.GetSegmentation()
            for i, region in enumerate(regions):
                segment = segmentation.GetNthSegment(i)
                segment.SetName(f"Region {region.label} (peak {region.peak:.3g})")
                segment.SetColor(*REGION_COLORS[i % len(REGION_COLORS)])

        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{base} anomaly regions table")
        table.SetAttribute(ATTR_REFERENCE_ID, reference.GetID())
        table.SetAttribute(ATTR_ROLE, "regionsTable")
        table.SetAttribute("AnomalyDetection.regionsSource", self.regions_source)
        table.SetAttribute("AnomalyDetection.regionsThreshold", repr(float(threshold)))
        self._fill_table(table, regions)
        return seg, table, regions

    def server_regions(self, heat) -> Optional[Dict[str, Any]]:
        """The server's regions stored on ``heat`` by ``show_heatmap``: ``{"pixel_threshold", "n_regions",
        "regions"}``, or None."""
        text = heat.GetAttribute(ATTR_SERVER_REGIONS) if heat is not None else None
        if not text:
            return None
        try:
            info = json.loads(text)
        except ValueError:
            return None
        if not isinstance(info, dict) or not isinstance(info.get("regions"), list):
            return None
        if _to_float(info.get("pixel_threshold"), None) is None:
            return None
        return info

    def _use_server_regions(self, heat, labels: np.ndarray, regions: List[Region], threshold: float,
                            min_voxels: int) -> Tuple[np.ndarray, List[Region]]:
        """Replace the computed rows by the server's where it sent them for this threshold (see make_regions)."""
        self.regions_source, self.regions_note = "heatmap", ""
        info = self.server_regions(heat)
        if info is None:
            return labels, regions
        dtype = _scalar_dtype(heat)
        server_t = float(info["pixel_threshold"])
        if not same_threshold(threshold, server_t, dtype):
            self.regions_note = (f"threshold {threshold:.4g} is not the server's {server_t:.4g}: regions computed "
                                 "from the heatmap")
            return labels, regions
        wanted = [r for r in info["regions"] if isinstance(r, dict)
                  and int(_to_float(r.get("n_voxels"), 0)) >= max(1, int(min_voxels))]
        matched: Dict[int, Dict[str, Any]] = {}
        tolerance_mm = max(1e-3, 0.05 * min(abs(x) for x in heat.GetSpacing()))
        for r in wanted:
            local = _match_region(regions, r, tolerance_mm)
            if local is None or local.label in matched:
                self.regions_note = ("the server's regions do not match the heatmap: regions computed from the "
                                     "heatmap")
                return labels, regions
            matched[local.label] = r
        m = vtk.vtkMatrix4x4()
        heat.GetIJKToRASMatrix(m)
        ijk_to_ras = slicer.util.arrayFromVTKMatrix(m)
        by_label = {r.label: r for r in regions}
        order = list(matched) + [r.label for r in regions if r.label not in matched]
        remap = np.zeros(len(regions) + 1, np.int32)
        out: List[Region] = []
        for new, old in enumerate(order, start=1):
            remap[old] = new
            if old in matched:
                out.append(_region_from_server(new, matched[old], by_label[old], ijk_to_ras))
            else:
                local = by_label[old]
                out.append(Region(new, local.n_voxels, local.volume_mm3, local.peak, local.mean, local.centroid_ijk,
                                  local.centroid_ras, "heatmap"))
        self.regions_source = "server" if len(matched) == len(out) else "server+heatmap"
        return remap[labels], out

    REGION_COLUMNS = ("Region", "Voxels", "Volume (mm3)", "Peak", "Mean", "R", "A", "S")

    def _fill_table(self, table, regions: Sequence[Region]) -> None:
        t = table.GetTable()
        columns = []
        for i, name in enumerate(self.REGION_COLUMNS):
            col = vtk.vtkIntArray() if i < 2 else vtk.vtkDoubleArray()
            col.SetName(name)
            columns.append(col)
        for r in regions:
            values = (r.label, r.n_voxels, r.volume_mm3, r.peak, r.mean) + tuple(r.centroid_ras)
            for col, v in zip(columns, values):
                col.InsertNextValue(v)
        for col in columns:
            t.AddColumn(col)
        table.Modified()

    def regions_table(self, reference):
        """The regions table node made for ``reference`` (e.g. restored with a scene), or None."""
        return self._find_by_role(reference, "regionsTable")

    def regions_from_table(self, table) -> List[Region]:
        """(main) The rows of a regions table node back as :class:`Region` (centroid_ijk unknown: NaN)."""
        t = table.GetTable()
        names = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
        if not set(self.REGION_COLUMNS) <= set(names):
            return []
        source = table.GetAttribute("AnomalyDetection.regionsSource") or "heatmap"
        out = []
        for row in range(t.GetNumberOfRows()):
            v = {c: t.GetValueByName(row, c) for c in self.REGION_COLUMNS}
            out.append(Region(
                label=v["Region"].ToInt(), n_voxels=v["Voxels"].ToInt(), volume_mm3=v["Volume (mm3)"].ToDouble(),
                peak=v["Peak"].ToDouble(), mean=v["Mean"].ToDouble(), centroid_ijk=(math.nan,) * 3,
                centroid_ras=(v["R"].ToDouble(), v["A"].ToDouble(), v["S"].ToDouble()),
                source="server" if source.startswith("server") else "heatmap"))
        return out

    @staticmethod
    def region_centroid_from_table(table, row: int) -> Tuple[float, float, float]:
        t = table.GetTable()
        return tuple(float(t.GetValueByName(row, c).ToDouble()) for c in ("R", "A", "S"))

    def remove_regions(self, reference) -> None:
        for role in ("regions", "regionsTable"):
            node = self._find_by_role(reference, role)
            while node is not None:
                self.scene.RemoveNode(node)
                node = self._find_by_role(reference, role)

    def jump_to(self, ras: Sequence[float]) -> None:
        """(main) Centre every slice view on ``ras`` (what a click on a region row does)."""
        for slice_node in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            slice_node.JumpSliceByCentering(float(ras[0]), float(ras[1]), float(ras[2]))

    def _find_by_role(self, reference, role: str):
        if reference is None:
            return None
        for node in slicer.util.getNodesByClass("vtkMRMLNode"):
            if node.GetAttribute(ATTR_ROLE) == role and node.GetAttribute(ATTR_REFERENCE_ID) == reference.GetID():
                return node
        return None

    # ============================================================================================ curate
    def mark(self, image_id: Optional[str], state: str) -> Dict[str, int]:
        """(worker) Store the curation state of a study and return the new counts per state."""
        if state not in CURATION_STATES:
            raise ValueError(f"state must be one of {CURATION_STATES}")
        if not image_id:
            raise ServerError(
                "This volume is not a study on the server yet: run 'Detect anomalies' on it with 'Add to the "
                "server's studies' checked, or load one with 'Next suspicious case'.", kind="bad_request")
        self.client.set_curation(image_id, state)
        return self.client.curation_counts()

    def curation_counts(self) -> Dict[str, int]:
        """(worker) Studies per state: normal, abnormal, excluded, unreviewed."""
        return self.client.curation_counts()

    def fetch_next_case(self, strategy: str) -> NextCase:
        """(worker) Ask the app's active-learning ``strategy`` for the next study and download it.

        ``NextCase.image_id`` is None when the strategy has nothing to offer now: every study is reviewed, or the
        rest are still being scored in the background (``pending``, with the server's ``message``).
        """
        answer = self.client.next_sample(strategy)
        image_id = answer["id"]
        if not image_id:
            return NextCase(None, None, answer["pending"], answer["message"])
        path = self.client.download_image(image_id, out_dir=tempfile.mkdtemp(dir=self.work_dir))
        return NextCase(image_id, path, answer["pending"], answer["message"])

    def load_case(self, image_id: str, path: str):
        """(main) Load a downloaded study, remember its datastore id and show it in the slice views."""
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.GetAttribute(ATTR_IMAGE_ID) == image_id and node.GetAttribute(ATTR_ROLE) is None:
                self.scene.RemoveNode(node)
        node = self.load_volume(path, name=image_id, image_id=image_id)
        slicer.util.setSliceViewerLayers(background=node, foreground=None)
        return node

    # ============================================================================================ retrain
    def start_training(self, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """(worker) ``POST /train/{train_task}``: train the current method's model on the studies marked normal."""
        return self.client.start_training(self.train_task, params or {})

    def stop_training(self) -> Dict[str, Any]:
        """(worker) ``DELETE /train/``."""
        return self.client.stop_training()

    def training_progress(self) -> TrainingProgress:
        """(worker) One poll: is a training running, how far (train_stats in /info/), which model version."""
        summary = self.connect()
        status = self.client.training_status() or {}
        state = str(status.get("status", "")).upper()
        # a submitted task has not started its process yet (seconds on a loaded machine): it is under way, so the
        # module keeps polling instead of reporting a training that "ended"
        running = state in ACTIVE_TRAIN_STATES
        task = self.train_task
        percent, text = train_progress(summary.train_stats, task)
        if state and state != "RUNNING":
            text = f"{state.lower()}: {text}"
            if state == "DONE":
                percent = 100
        stats = summary.train_stats.get(task) if isinstance(summary.train_stats.get(task), dict) else {}
        return TrainingProgress(running, percent, text, state, summary.model_version(self._method), summary,
                                warning=str(stats.get("warning") or ""))

    # ============================================================================================ model versions
    def model_versions(self) -> ModelVersions:
        """(worker) ``GET /model/versions``: the kept versions with one label each; ``supported`` is False when the
        server keeps none (an older app)."""
        try:
            res = self.client.list_versions()
        except ServerError as e:
            if e.kind in ("not_found", "bad_response") or e.status in (404, 405, 500):
                return ModelVersions("", [], [], supported=False)
            raise
        versions = [v for v in res.get("versions", []) if isinstance(v, dict) and v.get("version")]
        return ModelVersions(str(res.get("current") or ""), versions, [describe_version(v) for v in versions],
                             keep=int(res.get("keep_versions") or 0))

    def rollback(self, version: str) -> Dict[str, Any]:
        """(worker) ``POST /model/rollback?version=V``: the server serves ``version`` again from the next request on;
        returns its answer (``version``, ``previous_version``, ``served``)."""
        if not version:
            raise ValueError("Choose a model version first.")
        return self.client.rollback(version)


def at_or_above(values: np.ndarray, threshold: float) -> np.ndarray:
    """The module's one rule for "anomalous": ``values >= threshold``, compared in the heatmap's own type.

    That is the library's rule (``spmamba.scoring.abnormal_voxels``: ``heatmap >= threshold``, used by
    ``find_regions`` and the app's ``spmamba_seg`` label): numpy compares a float32 heatmap with a Python float
    threshold in float32.
    """
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.floating):
        return values >= values.dtype.type(threshold)
    return values >= float(threshold)


def display_lower_bound(threshold: float, dtype: Any = np.float32) -> float:
    """The smallest value of ``dtype`` that :func:`at_or_above` counts as anomalous: the lower bound of the display's
    inclusive threshold range, so the overlay shows exactly the voxels the regions are made of."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return float(dtype.type(threshold))
    return float(math.ceil(float(threshold)))


def same_threshold(a: float, b: float, dtype: Any = np.float32) -> bool:
    """Do thresholds ``a`` and ``b`` select the same voxels of a heatmap of type ``dtype``?"""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return bool(dtype.type(a) == dtype.type(b))
    return math.ceil(float(a)) == math.ceil(float(b))


def _scalar_dtype(volume) -> np.dtype:
    image = volume.GetImageData() if volume is not None else None
    if image is None:
        return np.dtype(np.float32)
    from vtk.util import numpy_support

    return np.dtype(numpy_support.get_numpy_array_type(image.GetScalarType()))


def _to_float(value: Any, default: Any) -> Any:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def _xyz(value: Any) -> Optional[Tuple[float, float, float]]:
    if isinstance(value, (list, tuple)) and len(value) == 3:
        try:
            out = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            return None
        if all(math.isfinite(v) for v in out):
            return out  # type: ignore[return-value]
    return None


def _match_region(regions: Sequence[Region], server: Dict[str, Any], tolerance_mm: float) -> Optional[Region]:
    """The computed region that is the server's ``server`` region: the same voxel count and the same centroid, in
    RAS (``centroid_ras``, within ``tolerance_mm``).  Voxel indices are compared only when the server sends no RAS
    centroid: the server's [i, j, k] are its array's, and Slicer may order a file's axes differently (it flips the
    slice axis of a NIfTI file with a left-handed affine, for example)."""
    n = int(_to_float(server.get("n_voxels"), -1))
    same_size = [r for r in regions if r.n_voxels == n]
    ras = _xyz(server.get("centroid_ras"))
    if ras is not None:
        best = min(same_size, key=lambda r: float(np.linalg.norm(np.subtract(r.centroid_ras, ras))), default=None)
        if best is not None and float(np.linalg.norm(np.subtract(best.centroid_ras, ras))) <= tolerance_mm:
            return best
        return None
    ijk = _xyz(server.get("centroid_voxel"))
    for region in same_size:
        if ijk is not None and max(abs(a - b) for a, b in zip(region.centroid_ijk, ijk)) <= 1e-2:
            return region
    return None


def _region_from_server(label: int, server: Dict[str, Any], local: Region, ijk_to_ras: np.ndarray) -> Region:
    """A table row from the server's region (its numbers), numbered ``label``; the matched computed region gives the
    voxel centroid in this volume's IJK (and the RAS centroid when the server sent none)."""
    c_ijk = local.centroid_ijk
    c_ras = _xyz(server.get("centroid_ras"))
    if c_ras is None:
        c_ras = tuple(float(x) for x in (ijk_to_ras @ np.append(np.asarray(c_ijk), 1.0))[:3])
    return Region(
        label=label,
        n_voxels=int(_to_float(server.get("n_voxels"), local.n_voxels)),
        volume_mm3=float(_to_float(server.get("volume_mm3"), local.volume_mm3)),
        peak=float(_to_float(server.get("peak"), local.peak)),
        mean=float(_to_float(server.get("mean"), local.mean)),
        centroid_ijk=tuple(c_ijk),  # type: ignore[arg-type]
        centroid_ras=tuple(c_ras),  # type: ignore[arg-type]
        source="server",
    )


def image_as_nrrd(path: str, out_dir: str) -> str:
    """A 2-D image file (PNG, JPEG, one DICOM file) as a one-slice .nrrd volume in ``out_dir``, read with ITK
    (SimpleITK, which Slicer bundles): ITK's geometry, as the server's reader (``spmamba.io``) gives it, so the
    server's heatmap of the image lies on it; colour as grey (luminance, ITU-R 601 weights), as the server sees it.
    Slicer's own reader would do for PNG, but not for every ITK build (slicer-core's has no PNG support)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    comps = img.GetNumberOfComponentsPerPixel()
    if comps > 1:
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        grey = arr[..., :3] @ np.asarray((0.299, 0.587, 0.114), np.float32) if comps in (3, 4) else arr.mean(-1)
        out = sitk.GetImageFromArray(grey)
        out.CopyInformation(img)
        img = out
    if img.GetDimension() == 2:
        img = sitk.JoinSeries(img)  # one slice, 1 mm, along the in-plane axes' normal
    dest = os.path.join(out_dir, _stem(path) + ".nrrd")
    sitk.WriteImage(img, dest, True)
    return dest


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd") + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _safe_id(name: str) -> str:
    """A datastore-friendly id from a node name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "volume").strip("._") or "volume"
