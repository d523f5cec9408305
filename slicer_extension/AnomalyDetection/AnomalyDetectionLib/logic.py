"""The module's Logic without Qt: MRML work (heatmap overlay, regions, slice jumps) and server calls.

Imports only numpy, vtk, ``slicer`` (MRML, module logics, ``slicer.util``) and the stdlib client, so it runs inside
Slicer and headless with ``slicer-core`` from PyPI.  Methods fall in two groups:

* **MRML methods** (``load_volume``, ``show_heatmap``, ``set_threshold``, ``make_regions``, ``jump_to`` ...) touch the
  scene and must run on Slicer's main thread;
* **remote methods** (``run_detection``, ``fetch_next_case``, ``training_progress`` ...) only talk to the server and
  write files, so the Widget runs them in a worker thread (``TaskRunner``) and feeds their results to the MRML
  methods when they finish.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk

from .client import (
    CURATION_STATES,
    DEFAULT_MODEL,
    AnomalyClient,
    DetectionResult,
    ServerError,
    ServerSummary,
    describe_version,
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


@dataclass
class DetectionJob:
    """What ``prepare_detection`` (main thread) hands to ``run_detection`` (worker thread)."""

    reference_id: str
    image_id: Optional[str]
    file_path: Optional[str]
    add_to_studies: bool
    upload_name: str


@dataclass
class TrainingProgress:
    """One poll of the server while training: for the progress bar and the model-version label."""

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

    :param server_url: MONAI Label server (the Widget remembers it in the application settings)
    :param model: the app's anomaly model name
    """

    def __init__(self, server_url: str = "http://127.0.0.1:8000", model: str = DEFAULT_MODEL, timeout: float = 10.0):
        self.model = model
        self.timeout = timeout
        self.client = AnomalyClient(server_url, timeout=timeout)
        self.work_dir = tempfile.mkdtemp(prefix="AnomalyDetection_")

    # ============================================================================================ settings
    @property
    def scene(self) -> "slicer.vtkMRMLScene":
        return slicer.mrmlScene

    def set_server_url(self, url: str) -> None:
        self.client = AnomalyClient(url, timeout=self.timeout)

    @property
    def server_url(self) -> str:
        return self.client.url

    # ============================================================================================ remote: info
    def connect(self) -> ServerSummary:
        """(worker) ``GET /info/`` -> models, model versions, strategies, training state."""
        return summarize_info(self.client.info())

    # ============================================================================================ MRML: volumes
    def load_volume(self, path: str, name: Optional[str] = None, image_id: Optional[str] = None):
        """(main) Read a .nii/.nii.gz/.nrrd file into a new scalar volume node through a storage node."""
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or _stem(path))
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(path)
        storage.SetSingleFile(True)
        if not storage.ReadData(node):
            self.scene.RemoveNode(node)
            self.scene.RemoveNode(storage)
            raise ServerError(f"Could not read the volume file {path} (not an image, or truncated).",
                              kind="bad_response")
        node.SetAndObserveStorageNodeID(storage.GetID())
        node.CreateDefaultDisplayNodes()
        if image_id:
            node.SetAttribute(ATTR_IMAGE_ID, image_id)
        return node

    def write_volume(self, node, path: str) -> str:
        """(main) Write a volume node to ``path`` (.nrrd or .nii.gz) without changing its storage node."""
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(path)
            storage.SetUseCompression(True)
            if not storage.WriteData(node):
                raise ServerError(f"Could not write {node.GetName()} to {path}.", kind="bad_request")
        finally:
            self.scene.RemoveNode(storage)
        return path

    @staticmethod
    def image_id_of(node) -> Optional[str]:
        return node.GetAttribute(ATTR_IMAGE_ID) if node is not None else None

    # ============================================================================================ detect
    def prepare_detection(self, volume, add_to_studies: bool = True) -> DetectionJob:
        """(main) Decide how to send ``volume``: by its datastore id, or as a file written now."""
        if volume is None:
            raise ValueError("Select an input volume first.")
        image_id = self.image_id_of(volume)
        file_path = None
        if not image_id:
            safe = _safe_id(volume.GetName())
            file_path = self.write_volume(volume, os.path.join(tempfile.mkdtemp(dir=self.work_dir), safe + ".nrrd"))
        return DetectionJob(volume.GetID(), image_id, file_path, add_to_studies, _safe_id(volume.GetName()))

    def run_detection(self, job: DetectionJob) -> DetectionResult:
        """(worker) Upload the volume if needed, run ``POST /infer/{model}`` and download the heatmap."""
        image_id = job.image_id
        if not image_id and job.add_to_studies:
            image_id = self.client.upload_image(job.file_path, image_id=job.upload_name)
        out_dir = tempfile.mkdtemp(dir=self.work_dir)
        if image_id:
            result = self.client.detect(image_id=image_id, model=self.model, out_dir=out_dir)
        else:
            result = self.client.detect(file_path=job.file_path, model=self.model, out_dir=out_dir)
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
        opacity: float = 0.5,
        result: Optional[DetectionResult] = None,
    ):
        """(main) Load ``heatmap_path`` as the foreground overlay of ``reference`` with a heat colour map.

        The heatmap must be on the reference's voxel grid; when it is (within 1e-3 mm) its geometry is copied
        exactly from the reference so the overlay cannot drift.  Below ``threshold`` (default: the result's
        calibrated pixel threshold, else the 99th percentile) voxels are transparent; window/level spans
        threshold..max.  Replaces an earlier heatmap of the same reference.
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
            if result.image_id and not self.image_id_of(reference):
                reference.SetAttribute(ATTR_IMAGE_ID, result.image_id)
        display = heat.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.heat_color_node_id())
        display.SetInterpolate(True)
        self.set_threshold(heat, threshold)
        slicer.util.setSliceViewerLayers(background=reference, foreground=heat, foregroundOpacity=opacity)
        return heat

    def heatmap_range(self, heat) -> Tuple[float, float]:
        lo, hi = heat.GetImageData().GetScalarRange()
        return float(lo), float(hi)

    def default_threshold(self, heat) -> float:
        arr = slicer.util.arrayFromVolume(heat)
        return float(np.percentile(arr, 99.0)) if arr.size else 0.0

    def set_threshold(self, heat, threshold: float) -> None:
        """(main) Voxels below ``threshold`` become transparent; colours span threshold..max."""
        lo, hi = self.heatmap_range(heat)
        threshold = float(threshold)
        top = max(hi, threshold + 1e-6)
        display = heat.GetDisplayNode()
        with slicer.util.NodeModify(display):
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(threshold, top)
            display.AutoThresholdOff()
            display.SetApplyThreshold(True)
            display.SetThreshold(threshold, top + abs(top) * 1e-3 + 1e-6)
        heat.SetAttribute("AnomalyDetection.displayThreshold", repr(threshold))

    def set_opacity(self, opacity: float) -> None:
        """(main) Foreground (heatmap) opacity in every slice view."""
        slicer.util.setSliceViewerLayers(foregroundOpacity=float(opacity))

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
        """(main) Connected regions (26-neighbourhood) of ``heatmap >= threshold`` with at least ``min_voxels``.

        Returns a label array shaped like ``arrayFromVolume(heat)`` (K, J, I), labels 1..N ordered by peak
        (highest first), and one :class:`Region` per label.
        """
        arr = slicer.util.arrayFromVolume(heat)
        image = vtk.vtkImageData()
        image.DeepCopy(heat.GetImageData())
        conn = vtk.vtkImageConnectivityFilter()
        conn.SetInputData(image)
        conn.SetScalarRange(float(threshold), float(max(arr.max(), threshold)) + 1.0)
        conn.SetExtractionModeToAllRegions()
        conn.SetLabelModeToSizeRank()
        conn.SetLabelScalarTypeToInt()
        conn.SetSizeRange(max(1, int(min_voxels)), 2 ** 62)
        conn.Update()
        out = conn.GetOutput()
        from vtk.util import numpy_support

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

        Returns ``(segmentation_node, table_node, regions)``; replaces earlier regions of the same reference.
        """
        if threshold is None:
            threshold = float(heat.GetAttribute("AnomalyDetection.displayThreshold") or self.default_threshold(heat))
        reference = self.scene.GetNodeByID(heat.GetAttribute(ATTR_REFERENCE_ID) or "") or heat
        self.remove_regions(reference)
        labels, regions = self.compute_regions(heat, threshold, min_voxels)
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
        self._fill_table(table, regions)
        return seg, table, regions

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
        """(worker) ``POST /train/{model}``: train on the studies marked normal."""
        return self.client.start_training(self.model, params or {})

    def stop_training(self) -> Dict[str, Any]:
        """(worker) ``DELETE /train/``."""
        return self.client.stop_training()

    def training_progress(self) -> TrainingProgress:
        """(worker) One poll: is a training running, how far (train_stats in /info/), which model version."""
        summary = self.connect()
        status = self.client.training_status() or {}
        state = str(status.get("status", "")).upper()
        running = state == "RUNNING"
        percent, text = train_progress(summary.train_stats, self.model)
        if state and not running:
            text = f"{state.lower()}: {text}"
            if state == "DONE":
                percent = 100
        stats = summary.train_stats.get(self.model) if isinstance(summary.train_stats.get(self.model), dict) else {}
        return TrainingProgress(running, percent, text, state, summary.model_version(self.model), summary,
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


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _safe_id(name: str) -> str:
    """A datastore-friendly id from a node name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "volume").strip("._") or "volume"
