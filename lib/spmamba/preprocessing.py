"""What the detector does to a volume once read: the canonical RAS grid, robust intensity scaling with a foreground
mask, and slices <-> square, normalised slice batches (reading and writing files is ``spmamba.io``'s).

Slicing convention: a volume is first reoriented to the closest canonical RAS voxel order (nibabel), so slice
axis 2 is axial whatever the file's orientation; the heatmap is mapped back to the file's voxel order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

__all__ = [
    "SliceGeometry", "CanonicalVolume", "to_canonical", "normalise_intensity", "slices_to_batch", "batch_to_slices",
    "SLICE_AXES", "Preprocessing", "prepare_slices", "LANDMARK_PERCENTILES", "intensity_landmarks",
    "standardise_intensity", "fit_landmarks",
]

SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


@dataclass
class CanonicalVolume:
    """A volume in closest-canonical RAS voxel order, plus what is needed to map results back.

    ``plane_swap``: for a single-slice image (a 2-D image read as a volume) whose one slice does not lie across the
    slice axis, the pair of RAS axes swapped so that it does (its one voxel along the slice axis); None otherwise.
    ``array`` and ``spacing`` are then in the swapped order, and ``to_file_order`` swaps back first."""

    array: np.ndarray  # (X', Y', Z') float32, RAS-ordered axes
    ornt: np.ndarray  # nibabel orientation of the file's voxel axes (io_orientation of its affine)
    spacing: np.ndarray  # (3,) voxel sizes in mm along the RAS-ordered axes (1 where the affine gives none)
    plane_swap: Optional[tuple] = None

    def spacing_slice_first(self, slice_axis: int) -> np.ndarray:
        """Voxel sizes in the order the detector works in: ``slice_axis`` first, then the other two."""
        return np.concatenate([self.spacing[[slice_axis]], np.delete(self.spacing, slice_axis)])

    def to_file_order(self, data: np.ndarray) -> np.ndarray:
        """Map an array on the RAS-ordered grid back to the file's voxel order."""
        if self.plane_swap is not None:
            data = np.swapaxes(data, *self.plane_swap)
        inv = orientations.ornt_transform(orientations.axcodes2ornt(("R", "A", "S")), self.ornt)
        return np.ascontiguousarray(orientations.apply_orientation(data, inv))


def to_canonical(array: np.ndarray, affine: Optional[np.ndarray], slice_axis: Optional[int] = None) -> CanonicalVolume:
    """Reorder/flip voxel axes so that axis 0,1,2 run towards R, A, S (no resampling).

    With ``slice_axis``: a single-slice image (one voxel along exactly one axis, e.g. a chest X-ray whose DICOM
    orientation makes it coronal) whose slice lies across another axis has that axis swapped with ``slice_axis``
    (``CanonicalVolume.plane_swap``), so slicing along ``slice_axis`` gives the image itself, not a stack of
    1-voxel-wide strips."""
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any():  # degenerate affine: keep the voxel order
        ornt = orientations.axcodes2ornt(("R", "A", "S"))
    to_ras = orientations.ornt_transform(ornt, orientations.axcodes2ornt(("R", "A", "S")))
    arr = np.ascontiguousarray(orientations.apply_orientation(array, to_ras))
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = np.where(sizes > 0, sizes, 1.0)
    swap = None
    if slice_axis is not None and arr.ndim == 3:
        single = [a for a in range(3) if arr.shape[a] == 1]
        if len(single) == 1 and single[0] != slice_axis:
            swap = (single[0], int(slice_axis))
            arr = np.ascontiguousarray(np.swapaxes(arr, *swap))
            spacing[list(swap)] = spacing[list(swap[::-1])]
    return CanonicalVolume(arr, ornt, spacing, swap)


def normalise_intensity(array: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
                        max_value: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Robust per-volume scaling and a foreground mask.

    Foreground = voxels above 5% of the (1st..99th percentile) range above the 1st percentile (air/background
    in MRI and CT alike); the [low_pct, high_pct] percentiles of the foreground map to [0, 1], and the result is
    clipped to [0, max_value]. The headroom above 1 matters: lesions brighter than any normal tissue (MS plaques,
    haemorrhage and enhancing rims on T1) sit above the 99.5th percentile, and clipping them at 1 would make them
    look like white matter. ``max_value=1`` gives the plain [0, 1] scaling.
    Returns (normalised float32 array, foreground bool mask).
    """
    if max_value < 1.0:
        raise ValueError(f"max_value must be >= 1 (the {high_pct} percentile maps to 1), got {max_value}")
    a = np.asarray(array, dtype=np.float32)
    sample = a.ravel()
    if sample.size > 2_000_000:  # percentiles of a strided sample: same answer, bounded time
        sample = sample[:: sample.size // 2_000_000 + 1]
    p1, p99 = np.percentile(sample, [1, 99])
    cut = p1 + 0.05 * (p99 - p1)
    fg_sample = sample[sample > cut]
    if fg_sample.size < 16 or p99 <= p1:
        lo, hi = float(sample.min()), float(sample.max())
    else:
        lo, hi = np.percentile(fg_sample, [low_pct, high_pct])
    scale = 1.0 / max(hi - lo, 1e-6)
    out = np.clip((a - lo) * scale, 0.0, max_value).astype(np.float32)
    return out, a > cut


#: foreground percentiles whose intensities are matched between volumes (standardise_intensity)
LANDMARK_PERCENTILES: tuple[float, ...] = (1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0)


def intensity_landmarks(norm: np.ndarray, fg: np.ndarray,
                        percentiles: "tuple[float, ...] | list[float]" = LANDMARK_PERCENTILES) -> np.ndarray:
    """The intensities of ``norm`` at ``percentiles`` of its foreground ``fg`` (a strided sample of at most 2 M
    voxels). -> (len(percentiles),) float64, non-decreasing."""
    v = np.asarray(norm, dtype=np.float32)[np.asarray(fg, dtype=bool)]
    if v.size < 16:
        raise ValueError(f"{v.size} foreground voxels: too few to standardise the intensities")
    if v.size > 2_000_000:
        v = v[:: v.size // 2_000_000 + 1]
    return np.maximum.accumulate(np.percentile(v, list(percentiles)).astype(np.float64))


def standardise_intensity(norm: np.ndarray, fg: np.ndarray, landmarks: "list | tuple", max_value: float = 2.0
                          ) -> np.ndarray:
    """Piecewise-linear intensity standardisation (Nyul and Udupa's landmark method): the foreground intensities of
    ``norm`` at each landmark's percentile are mapped onto the landmark's intensity, linearly in between and beyond
    the ends (with the slopes of the end segments), clipped to [0, ``max_value``]; voxels outside ``fg`` are kept.
    ``landmarks``: [(percentile, intensity), ...] as ``fit_landmarks`` makes them.

    Why: scanners, sequences and subjects give the same tissue different intensities, even after the per-volume
    scaling of ``normalise_intensity`` (which fixes only the two ends of the range); a method that compares a voxel
    with the normals at the same position, or distils a teacher's features of the slices, then sees contrast where
    there is only a different grey level of grey matter."""
    pct = [float(p) for p, _ in landmarks]
    target = np.asarray([float(v) for _, v in landmarks], dtype=np.float64)
    own = intensity_landmarks(norm, fg, pct)
    # strictly increasing knots for np.interp (flat stretches of a histogram would repeat a value)
    own = own + np.arange(own.size) * 1e-6
    a = np.asarray(norm, dtype=np.float32)
    x = a.astype(np.float64)
    out = np.interp(x, own, target)
    lo_slope = (target[1] - target[0]) / (own[1] - own[0])
    hi_slope = (target[-1] - target[-2]) / (own[-1] - own[-2])
    out = np.where(x < own[0], target[0] + (x - own[0]) * lo_slope, out)
    out = np.where(x > own[-1], target[-1] + (x - own[-1]) * hi_slope, out)
    out = np.clip(out, 0.0, max_value).astype(np.float32)
    return np.where(np.asarray(fg, dtype=bool), out, a)


def fit_landmarks(volumes, percentiles: "tuple[float, ...]" = LANDMARK_PERCENTILES) -> list:
    """The standard scale of ``standardise_intensity`` from normal volumes (an iterable of (norm, fg) pairs): the
    mean intensity of each percentile over them. -> [[percentile, intensity], ...]."""
    marks = [intensity_landmarks(n, f, percentiles) for n, f in volumes]
    if not marks:
        raise ValueError("fit_landmarks needs at least one volume")
    mean = np.maximum.accumulate(np.mean(marks, axis=0))
    return [[float(p), float(round(v, 6))] for p, v in zip(percentiles, mean)]


@dataclass
class SliceGeometry:
    """How a (h, w) slice was padded to a square and resized to S x S, to undo it."""

    h: int
    w: int
    side: int
    top: int
    left: int


def slices_to_batch(slices: np.ndarray, size: int) -> tuple[torch.Tensor, SliceGeometry]:
    """(n, h, w) scaled intensities -> (n, 1, size, size): centred zero-padding to a square, then area/bilinear resize."""
    n, h, w = slices.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    sq = np.zeros((n, side, side), dtype=np.float32)
    sq[:, top:top + h, left:left + w] = slices
    t = torch.from_numpy(sq).unsqueeze(1)
    if side != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
    return t, SliceGeometry(h, w, side, top, left)


def batch_to_slices(maps: torch.Tensor, geom: SliceGeometry) -> np.ndarray:
    """(n, S, S) maps -> (n, h, w) on the slice grid (inverse of slices_to_batch)."""
    t = maps.unsqueeze(1).float()
    if geom.side != t.shape[-1]:
        t = F.interpolate(t, size=(geom.side, geom.side), mode="bilinear", align_corners=False)
    t = t[:, 0, geom.top:geom.top + geom.h, geom.left:geom.left + geom.w]
    return t.cpu().numpy()


@dataclass
class Preprocessing:
    """The Detector's preprocessing settings, stored in the model file."""

    slice_axis: int = 2  # in RAS voxel order: 0 sagittal, 1 coronal, 2 axial
    min_foreground: float = 0.02  # a slice is scored when at least this share of it is foreground
    batch_size: int = 16
    # intensities are scaled so the foreground's 0.5..99.5 percentiles span [0, 1], then clipped to
    # [0, intensity_max]: the headroom keeps lesions brighter than any normal tissue distinct (normalise_intensity)
    intensity_max: float = 2.0
    # after the slices are assembled: 3-D Gaussian smoothing of the heatmap inside the foreground, sigma in mm
    # (the Detector, with scoring.smooth_within_mask; 0 = off, as published)
    heatmap_sigma_mm: float = 2.0
    # intensity standardisation (standardise_intensity): training fits the landmarks on its normals
    # (fit_landmarks) when ``standardise`` is on; [[percentile, intensity], ...] or None (not standardised)
    standardise: bool = True
    intensity_landmarks: Optional[list] = None

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        d = dict(d)
        if d and "intensity_max" not in d:  # files written before these settings existed
            d["intensity_max"] = 1.0  # were trained on [0, 1]
            d.setdefault("heatmap_sigma_mm", 0.0)  # and calibrated on unsmoothed heatmaps
        if d and "standardise" not in d:  # written before standardisation existed: trained without it
            d["standardise"] = False
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def prepare_slices(array: np.ndarray, affine: Optional[np.ndarray], prep: Preprocessing):
    """Volume -> (normalised slices (n, h, w) along the slice axis in RAS order, their foreground mask (n, h, w),
    indices of the slices worth scoring (enough foreground), canonical volume)."""
    canon = to_canonical(array, affine, prep.slice_axis)
    vol = np.moveaxis(canon.array, prep.slice_axis, 0)
    norm, fg = normalise_intensity(vol, max_value=prep.intensity_max)
    if prep.intensity_landmarks and fg.sum() >= 16:
        norm = standardise_intensity(norm, fg, prep.intensity_landmarks, prep.intensity_max)
    fg_share = fg.reshape(fg.shape[0], -1).mean(1)
    keep = [int(i) for i in np.nonzero(fg_share >= prep.min_foreground)[0]]
    return norm, fg, keep, canon
