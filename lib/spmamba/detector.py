"""A trained model of any registered method (``spmamba.methods``; SP-Mamba by default) with its preprocessing and
calibration: volume in, heatmap + score out. The Detector depends on the method seam (``methods.AnomalyModel``), not
on a particular method: slice methods (``SliceModel``, e.g. SP-Mamba) score the kept slices in batches, volume
methods (``VolumeModel``, e.g. the voxel-wise baseline) score the whole preprocessed volume; everything else below is
the same for every method.

Volume pipeline: reorient to RAS voxel order -> move the slice axis first -> robust intensity scaling (normal
tissue to [0, 1], headroom above) -> keep slices with enough foreground -> pad to square + resize to S x S -> model
in batches (inference mode) -> anomaly maps resized back onto each slice -> 3-D smoothing inside the foreground
(``Preprocessing.heatmap_sigma_mm``; 0 outside it) -> heatmap in the file's voxel order (slices without foreground
are 0).

Volume score: slice methods: mean of the 3 highest slice scores (``scoring.aggregate_slice_scores``; a slice score
is the method's score of that slice's map, e.g. SP-Mamba's image score); volume methods: their own volume score
(slice scores are then the maxima of the heatmap's slices).

Optional position-aware normalisation (``Detector.position_stats``, off unless fitted; ``train_detector(...,
position_normalise=True)``): for volumes on one common grid (registered to a template), each voxel of the heatmap is
replaced by its z-score against the heatmaps the model gave at that position on normal volumes (negative values
clipped to 0, 0 outside the foreground). Slice score = max of the normalised slice, volume score = mean of the 50
highest voxels (``baselines.topk_mean``). Volumes on another grid are refused with a clear error.

Optional intensity fusion (``Detector.intensity_stats``, fitted in the same pass as the position statistics; on by
default for methods whose maps are not intensity statistics already, ``AnomalyModel.fuse_intensity``): the
position-normalised map is fused with the |z|-score of each voxel's standardised intensity against the normals at
that position (variance pooled over 4 mm; each voxel's smallest |z| within ``Detector.intensity_search_mm``, 4 mm
for new models, which forgives residual misregistration at tissue boundaries; smoothed at 2 mm: the voxel-wise
baseline's map) by
``scoring.fuse_maps`` (``Detector.fusion``; default ``geometric``: sqrt(z_model * z_intensity)). A voxel then scores
high only where the model's features and its intensity both depart from normal: the model's map alone is blurred
by its feature resolution (it misses small bright foci), the intensity map alone flags every residual
misregistration at the brain's edges; the fused map beats both (docs/BENCHMARKS.md, "Intensity fusion"). The
geometric mean has no weight to tune: the ranking of voxels does not depend on either map's scale.

Optional anatomical alignment (``Detector.alignment``, an ``registration.AffineAligner`` stored in the model file;
``train_detector(..., align="affine")``): every input is first registered affinely to the model's reference and
resampled onto the reference grid, the pipeline above runs there, and the heatmap and foreground are resampled back
onto the input grid (same shape and affine as the input; 0 where the input lies outside the reference grid).
A registration that fails its checks raises ``registration.AlignmentError`` (a ``VolumeError``) naming the volume;
``DetectionResult.alignment`` reports the similarity, scales and seconds of a successful one. Slice indices in
``slice_scores`` then refer to the reference grid.
"""
from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch

from . import __version__
from .baselines import VoxelwiseAccumulator, VoxelwiseStats, position_normalise, topk_mean, zscore_heatmap
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, weights_digest
from .io import validate_array
from .methods import DEFAULT_METHOD, SLICE, AnomalyModel, PreparedVolume, UnknownMethod, get_method
from .preprocessing import Preprocessing, batch_to_slices, prepare_slices, slices_to_batch, to_canonical
from .registration import AffineAligner
from .scoring import FUSIONS, INTENSITY_SEARCH_MM, aggregate_slice_scores, fuse_maps, smooth_within_mask

__all__ = ["Detector", "DetectionResult", "Calibration", "resolve_device", "DEFAULT_FUSION"]

#: the fusion ``train_detector`` fits by default for methods that fuse (``AnomalyModel.fuse_intensity``) when
#: position-aware normalisation is on (``scoring.fuse_maps``; measured in docs/BENCHMARKS.md)
DEFAULT_FUSION = "geometric"


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    return dev


@dataclass
class Calibration:
    """Thresholds measured on held-out normal volumes."""

    pixel_threshold: float = float("inf")
    volume_threshold: float = float("inf")
    pixel_fpr: float = 0.001
    volume_fpr: float = 0.05
    n_volumes: int = 0
    normal_volume_scores: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class DetectionResult:
    heatmap: np.ndarray  # float32, same shape as the input volume
    score: float
    threshold: float
    pixel_threshold: float
    abnormal: bool
    slice_axis: int
    slice_scores: list  # [(slice index in RAS order, score)]
    timings: dict
    foreground: Optional[np.ndarray] = None  # bool, same shape: voxels the intensity scaling counts as tissue
    # models with alignment: Alignment.summary() (reference, similarity, metric_floor, scales, seconds,
    # matrix_ras = reference RAS point -> input RAS point); None for models without alignment
    alignment: Optional[dict] = None


def _in_order(fn: Callable, items) -> Iterator:
    return (fn(i, item) for i, item in enumerate(items))


class Detector:
    """Model of a registered method + preprocessing + calibration + metadata."""

    #: volume score under position-aware normalisation: mean of this many highest voxels
    POSITION_TOP_K = 50
    #: position statistics pool each voxel's variance with its neighbours' (Gaussian sigma in mm;
    #: ``VoxelwiseStats.fit(pool_sigma=...)`` says why)
    POSITION_POOL_MM = 4.0
    #: intensity fusion: the intensity statistics' variance pooled over this (Gaussian sigma, mm), and their |z| map
    #: smoothed by this (mm) before it is fused (the voxel-wise baseline's settings at 2 mm: 2 and 1 voxels)
    INTENSITY_POOL_MM = 4.0
    INTENSITY_SMOOTH_MM = 2.0
    #: intensity fusion: each voxel's |z| is the smallest against the normals within this distance (mm, per axis;
    #: ``baselines.search_zscore``): the residual misregistration that the plain |z| flags at every tissue boundary.
    #: The default of new fits; a model file keeps its own (files written before it existed: 0, no search)
    INTENSITY_SEARCH_MM = INTENSITY_SEARCH_MM

    def __init__(self, model: AnomalyModel, preprocessing: Optional[Preprocessing] = None,
                 calibration: Optional[Calibration] = None, meta: Optional[dict] = None, device="auto",
                 position_stats: Optional[VoxelwiseStats] = None, alignment: Optional[AffineAligner] = None,
                 intensity_stats: Optional[VoxelwiseStats] = None, fusion: str = "geometric",
                 intensity_search_mm: float = 0.0):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.preprocessing = preprocessing or Preprocessing(**dict(model.preprocessing_defaults))
        self.calibration = calibration or Calibration()
        self.meta = dict(meta or {})
        # per-voxel statistics of the heatmaps of normal volumes, on the canonical slice-first grid (or None)
        self.position_stats = position_stats
        # per-voxel statistics of the normals' standardised intensities on the same grid, fused with the normalised
        # heatmap (or None); only with position_stats
        self.intensity_stats = intensity_stats
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        self.fusion = fusion  # how the two maps are combined (scoring.fuse_maps); used only with intensity_stats
        # the intensity |z| map's search distance (mm; 0 = the plain |z|); used only with intensity_stats
        self.intensity_search_mm = search_distance(intensity_search_mm)
        # affine registration of every input to a reference (or None: inputs are used on their own grid)
        self.alignment = alignment
        self._version: Optional[str] = None

    # ------------------------------------------------------------------ files
    @property
    def config(self):
        return self.model.config

    @property
    def method_name(self) -> str:
        """The registry name of the model's method (``spmamba.methods``), written into the model file."""
        return self.model.method

    @property
    def version(self) -> str:
        """Content hash of weights + calibration: changes with every training."""
        if self._version is None:
            extra: Any = asdict(self.calibration)
            if self.position_stats is not None:
                # (statistics written before supports existed keep their version: no support bytes)
                extra = {"calibration": extra,
                         "position_stats": hashlib.sha256(_stats_bytes(self.position_stats)).hexdigest()}
                if self.intensity_stats is not None:  # models without it keep the version they always had
                    extra["intensity_stats"] = hashlib.sha256(_stats_bytes(self.intensity_stats)).hexdigest()
                    extra["fusion"] = self.fusion
                    if self.intensity_search_mm > 0:  # models without a search keep the version they had
                        extra["intensity_search_mm"] = self.intensity_search_mm
            if self.alignment is not None:  # models without alignment keep the version they always had
                al_meta, ref = self.alignment.to_payload()
                extra = {"model": extra, "alignment": repr(al_meta),
                         "reference": hashlib.sha256(ref.numpy().tobytes()).hexdigest()}
            self._version = weights_digest(self.model.state_dict(), extra)
        return self._version

    def invalidate_version(self) -> None:
        self._version = None

    def checkpoint_payload(self) -> dict[str, Any]:
        payload = {
            "method": self.method_name,
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "calibration": asdict(self.calibration),
            "preprocessing": asdict(self.preprocessing),
            "meta": {**self.meta, "library_version": __version__, "torch_version": str(torch.__version__)},
            "version": self.version,
        }
        if self.position_stats is not None:
            payload["position_stats"] = _stats_payload(self.position_stats)
        if self.intensity_stats is not None:
            payload["intensity_stats"] = {**_stats_payload(self.intensity_stats), "fusion": self.fusion,
                                          "search_mm": self.intensity_search_mm}
        if self.alignment is not None:
            payload["alignment"], payload["alignment_reference"] = self.alignment.to_payload()
        return payload

    def save(self, path: Union[str, Path], training_state: Optional[dict] = None) -> Path:
        payload = self.checkpoint_payload()
        if training_state is not None:
            payload["training_state"] = training_state
        return save_checkpoint(path, payload)

    @classmethod
    def from_payload(cls, obj: dict, device="auto", source: str = "checkpoint") -> "Detector":
        name = obj.get("method", DEFAULT_METHOD)  # files written before methods had names are SP-Mamba's
        try:
            method = get_method(name)
        except UnknownMethod as e:
            raise CheckpointError(f"{source} holds a model of method {name!r}, which this spmamba does not know "
                                  f"({e})") from e
        try:
            config = method.get_config(obj["config"])
            model = method.build(config, encoder_weights="none")  # the file holds pretrained parts' weights too
            model.load_state_dict(obj["state_dict"])
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{source} does not fit this version's {name} model: {e}") from e
        ist = dict(obj.get("intensity_stats") or {})
        fusion = ist.pop("fusion", "geometric")
        search_mm = ist.pop("search_mm", 0.0)  # files written before the search existed: none
        if not isinstance(search_mm, (int, float)) or not search_mm >= 0:
            raise CheckpointError(f"{source}: its intensity search distance {search_mm!r} is not a distance in mm; "
                                  "it was not written by spmamba")
        if fusion not in FUSIONS:
            raise CheckpointError(f"{source}: unknown intensity fusion {fusion!r} (this spmamba knows "
                                  f"{', '.join(FUSIONS)}); it was written by another version")
        stats, istats = _stats_from_payload(obj.get("position_stats")), _stats_from_payload(ist or None)
        if istats is not None and stats is None:
            raise CheckpointError(f"{source}: it holds intensity statistics without position statistics; it was not "
                                  "written by spmamba")
        aligner = None
        if obj.get("alignment") is not None:  # files written before alignment existed have none
            try:
                aligner = AffineAligner.from_payload(obj["alignment"], obj["alignment_reference"])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{source}: its alignment settings cannot be read ({e})") from e
        det = cls(model, Preprocessing.from_dict(obj.get("preprocessing", {})),
                  Calibration.from_dict(obj.get("calibration", {})), obj.get("meta", {}), device, stats, aligner,
                  istats, fusion, search_mm)
        return det

    @classmethod
    def load(cls, path: Union[str, Path], device="auto") -> "Detector":
        return cls.from_payload(load_checkpoint(path), device, source=f"model file {path}")

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def score_slices(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice methods: (n, 1, S, S) scaled intensities -> (anomaly maps (n, S, S), slice scores (n,)) on the CPU."""
        self.model.eval()
        maps, scores = self.model.score_slices(batch.to(self.device, non_blocking=True))
        return maps.float().cpu(), scores.float().cpu()

    @torch.inference_mode()
    def score_volume(self, volume: PreparedVolume) -> tuple[np.ndarray, float]:
        """Volume methods: a preprocessed volume -> (heatmap (n, h, w) float32, volume score)."""
        self.model.eval()
        heat, score = self.model.score_volume(volume)
        return np.asarray(heat, dtype=np.float32), float(score)

    def detect(self, array: np.ndarray, affine: Optional[np.ndarray] = None,
               progress: Optional[Callable[[int, int], None]] = None, *, name: Optional[str] = None,
               aligned: bool = False) -> DetectionResult:
        """Heatmap on the input grid and the volume verdict. ``array``: (X, Y, Z) or a 2-D image.

        Models with alignment register the volume to their reference first (``name`` appears in an
        AlignmentError); ``aligned=True`` says the volume is already on the model's reference grid (no
        registration; maps stay on that grid)."""
        t0 = time.perf_counter()
        arr = validate_array(array, name or "array")
        al = None
        if self.alignment is not None and not aligned:
            al = self.alignment.align(arr, affine, name=name or "volume")
            array, arr, affine = al.array, al.array, al.affine
        t_align = time.perf_counter() - t0
        prep = self.preprocessing
        norm, fg, keep, canon = prepare_slices(arr, affine, prep)
        t1 = time.perf_counter()
        heat, slice_scores, volume_score = self._model_maps(norm, fg, keep, canon, progress)
        if prep.heatmap_sigma_mm > 0 and keep:
            heat = smooth_within_mask(heat, fg, prep.heatmap_sigma_mm / canon.spacing_slice_first(prep.slice_axis))
        if self.position_stats is not None:
            if heat.shape != self.position_stats.mean.shape:
                raise ValueError(
                    f"this model normalises heatmaps per position and needs volumes on its template grid "
                    f"{self.position_stats.mean.shape} (slice axis first, RAS order); this volume gives {heat.shape}. "
                    "Register the volume to the template, or use a model trained without position_normalise.")
            heat = position_normalise(heat, self.position_stats, fg)
            if self.intensity_stats is not None:
                heat = fuse_maps(heat, self.intensity_zscores(norm, fg, canon), self.fusion)
            slice_scores = [(i, float(heat[i].max())) for i, _ in slice_scores]
        t2 = time.perf_counter()
        heatmap = canon.to_file_order(np.moveaxis(heat, 0, prep.slice_axis)).astype(np.float32, copy=False)
        foreground = canon.to_file_order(np.moveaxis(fg, 0, prep.slice_axis))
        in_shape = np.shape(array)
        if heatmap.shape != in_shape:  # 2-D input (X, Y) or trailing singleton axes: back to the input's shape
            heatmap = heatmap.reshape(in_shape)
            foreground = foreground.reshape(in_shape)
        if al is not None:  # from the reference grid back onto the input's own grid (0 outside the foreground)
            foreground = al.to_input(foreground)
            heatmap = np.where(foreground, al.to_input(heatmap), np.float32(0.0))
        if self.position_stats is not None:
            score = topk_mean(heat, self.POSITION_TOP_K)
        elif volume_score is not None:
            score = volume_score
        else:
            score = aggregate_slice_scores(np.array([s for _, s in slice_scores]))
        cal = self.calibration
        t3 = time.perf_counter()
        return DetectionResult(
            heatmap=heatmap, score=score, threshold=float(cal.volume_threshold),
            pixel_threshold=float(cal.pixel_threshold), abnormal=bool(score > cal.volume_threshold),
            slice_axis=prep.slice_axis, slice_scores=slice_scores,
            timings={"prepare_s": t1 - t0 - t_align, "model_s": t2 - t1, "assemble_s": t3 - t2, "total_s": t3 - t0,
                     **({"align_s": t_align} if al is not None else {})},
            foreground=foreground, alignment=al.summary() if al is not None else None,
        )

    def intensity_zscores(self, norm: np.ndarray, fg: np.ndarray, canon) -> np.ndarray:
        """|z| of the standardised intensities ``norm`` ((n, h, w), slice-first canonical grid, foreground ``fg``)
        against ``intensity_stats``, each the smallest within ``intensity_search_mm`` (``baselines.search_zscore``),
        smoothed by INTENSITY_SMOOTH_MM; 0 outside the foreground and the support."""
        spacing = canon.spacing_slice_first(self.preprocessing.slice_axis)
        return zscore_heatmap(norm, fg, self.intensity_stats, [self.INTENSITY_SMOOTH_MM / float(s) for s in spacing],
                              search=search_voxels(self.intensity_search_mm, spacing))

    def _model_maps(self, norm: np.ndarray, fg: np.ndarray, keep: list, canon,
                    progress: Optional[Callable[[int, int], None]]) -> tuple[np.ndarray, list, Optional[float]]:
        """The method's part of ``detect`` on the canonical slice-first grid: (heatmap (n, h, w) float32, [(slice,
        score)] of the kept slices, the volume score of a volume method or None)."""
        prep = self.preprocessing
        if self.model.kind != SLICE:
            if progress is not None:
                progress(0, 1)
            heat, score = self.score_volume(
                PreparedVolume(norm, fg, keep, canon.spacing_slice_first(prep.slice_axis)))
            if progress is not None:
                progress(1, 1)
            return heat, [(i, float(heat[i].max())) for i in keep], score
        heat = np.zeros(norm.shape, dtype=np.float32)
        slice_scores: list[tuple[int, float]] = []
        S = self.model.image_size
        for start in range(0, len(keep), prep.batch_size):
            idx = keep[start:start + prep.batch_size]
            batch, geom = slices_to_batch(norm[idx], S)
            maps, scores = self.score_slices(batch)
            heat[idx] = batch_to_slices(maps, geom)
            slice_scores += [(i, float(s)) for i, s in zip(idx, scores.tolist())]
            if progress is not None:
                progress(min(start + prep.batch_size, len(keep)), len(keep))
        return heat, slice_scores, None

    def fit_position_stats(self, volumes, progress: Optional[Callable[[int, int], None]] = None,
                           aligned: bool = False, fusion: Optional[str] = None,
                           map_volumes: Optional[Callable] = None,
                           intensity_search_mm: Optional[float] = None) -> VoxelwiseStats:
        """Fit (and switch on) position-aware normalisation from normal volumes (objects with ``array`` and
        ``affine``, all on one grid). The statistics are of the raw heatmaps, on the canonical slice-first grid.
        With alignment the volumes are registered to the reference first (``aligned=True``: they already are).
        ``fusion`` (one of ``scoring.FUSIONS``): in the same pass, fit the statistics of the normals' intensities
        and fuse their |z| map with the normalised heatmap that way (``Detector.intensity_stats``); None: no fusion.
        ``intensity_search_mm``: that |z| map's search distance (None: INTENSITY_SEARCH_MM; 0: the plain |z|).
        ``map_volumes(fn, volumes)``: yields ``fn(i, volume)`` for every volume, in order (default: one after the
        other, here; ``spmamba.distributed.Ranks.map``: each training process detects its share)."""
        if fusion is not None and fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        search_mm = search_distance(self.INTENSITY_SEARCH_MM if intensity_search_mm is None else intensity_search_mm)
        self.position_stats = self.intensity_stats = None
        intensity = fusion is not None
        prep = self.preprocessing
        spacing: list = []
        intensities = VoxelwiseAccumulator()

        def heatmap(i, v):  # -> (heatmap, foreground) canonical and slice-first, spacing (mm), intensities or None
            array, affine = v.array, v.affine
            if self.alignment is not None and not aligned:
                al = self.alignment.align(array, affine, name=str(getattr(v, "path", None) or f"volume {i}"))
                array, affine = al.array, al.affine
            res = self.detect(array, affine, aligned=True)
            canon = to_canonical(res.heatmap.reshape(np.shape(array)), affine, prep.slice_axis)
            fg = to_canonical(res.foreground.reshape(np.shape(array)), affine, prep.slice_axis)
            # the normalised intensities (slice-first, as the heatmaps) for the fused intensity statistics
            slices = prepare_slices(array, affine, prep)[:2] if intensity else None
            if progress is not None:
                progress(i + 1, len(volumes))
            return ((np.moveaxis(canon.array, prep.slice_axis, 0), np.moveaxis(fg.array, prep.slice_axis, 0)),
                    canon.spacing_slice_first(prep.slice_axis), slices)

        def maps():
            for pair, mm, slices in (map_volumes or _in_order)(heatmap, volumes):
                spacing.append(mm)
                if slices is not None:
                    intensities.add(*slices)
                yield pair

        maps_and_fg = maps()
        first = next(maps_and_fg, None)
        if first is None:
            raise ValueError("fit_position_stats needs at least 2 normal volumes, got none")
        pool = [self.POSITION_POOL_MM / float(s) for s in spacing[0]]
        self.position_stats = VoxelwiseStats.fit(itertools.chain([first], maps_and_fg), pool_sigma=pool)
        if intensity:
            self.intensity_stats = intensities.stats(pool_sigma=[self.INTENSITY_POOL_MM / float(s) for s in spacing[0]])
            self.fusion = fusion
        self.intensity_search_mm = search_mm if intensity else 0.0
        self.invalidate_version()
        return self.position_stats


def search_distance(distance_mm: float) -> float:
    """An intensity search distance (mm) checked: >= 0 (a NaN is refused too); ValueError otherwise."""
    if not float(distance_mm) >= 0:
        raise ValueError(f"intensity_search_mm must be >= 0 mm, got {distance_mm!r}")
    return float(distance_mm)


def search_voxels(distance_mm: float, spacing_mm) -> list[int]:
    """A search distance (mm) -> its radius in whole voxels along each axis of ``spacing_mm`` (rounded; 0 = none)."""
    return [int(round(float(distance_mm) / float(s))) for s in spacing_mm]


def _stats_bytes(stats: VoxelwiseStats) -> bytes:
    digest = stats.mean.tobytes() + stats.std.tobytes()
    return digest + (np.packbits(stats.support).tobytes() if stats.support is not None else b"")


def _stats_payload(stats: VoxelwiseStats) -> dict:
    out = {"mean": torch.from_numpy(stats.mean.copy()), "std": torch.from_numpy(stats.std.copy()), "n": int(stats.n)}
    if stats.support is not None:
        out["support"] = torch.from_numpy(stats.support.copy())
    return out


def _stats_from_payload(d: Optional[dict]) -> Optional[VoxelwiseStats]:
    if d is None:
        return None
    return VoxelwiseStats.from_dict({k: v.numpy() if torch.is_tensor(v) else v for k, v in d.items()})

