"""Volumes in and out: reading with clear errors, atomic writing, and volume <-> normalised slice batches.

Slicing convention: a volume is first reoriented to the closest canonical RAS voxel order (nibabel), so slice
axis 2 is axial whatever the file's orientation; the heatmap is mapped back to the file's voxel order.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

from spmamba.atomic import atomic_path

__all__ = [
    "VolumeError", "Volume", "load_volume", "validate_array", "save_volume", "volume_id", "volume_suffix",
    "is_volume_file", "VOLUME_SUFFIXES", "SliceGeometry", "CanonicalVolume", "to_canonical", "normalise_intensity",
    "slices_to_batch", "batch_to_slices", "SLICE_AXES",
]

#: the volume files the library reads (``.nhdr``: a detached NRRD header beside its data file), longest first
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")
MAX_VOXELS = 1024 ** 3 // 2  # 512 M voxels (2 GB as float32): beyond this a header is treated as absurd
MAX_SIDE = 8192
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
# RAS <-> LPS for NRRD (Slicer's world is LPS in files)
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeError(ValueError):
    """An input that cannot be used as a volume; the message names the input and says what is wrong."""


@dataclass
class Volume:
    array: np.ndarray  # float32 (X, Y, Z) in the file's voxel order
    affine: np.ndarray  # (4, 4) voxel -> RAS mm
    path: Optional[str] = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))


def volume_id(path: Union[str, Path]) -> str:
    """The id of a volume: its file name without the volume suffix ('a/sub-01.nii.gz' -> 'sub-01', any case of the
    suffix); a name without one is returned whole ('case.01' stays 'case.01'). The one rule for the CLI's output
    names, ``evaluate``'s matching of masks and labels, and the app's study ids."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


def volume_suffix(path: Union[str, Path]) -> Optional[str]:
    """The volume suffix of a file name as written in ``VOLUME_SUFFIXES`` ('.nii.gz' for 'A.NII.GZ'), or None."""
    low = Path(path).name.lower()
    return next((suf for suf in VOLUME_SUFFIXES if low.endswith(suf)), None)


def is_volume_file(path: Union[str, Path]) -> bool:
    """Whether the file name ends in one of ``VOLUME_SUFFIXES`` (any case)."""
    return volume_suffix(path) is not None


def validate_array(array: np.ndarray, name: str = "array") -> np.ndarray:
    """Check an image array and return it as float32 (X, Y, Z); 2-D images become (X, Y, 1)."""
    a = np.asarray(array)
    if a.dtype.names is not None:
        raise VolumeError(f"{name}: structured/RGB voxels ({a.dtype}) are not supported; convert to a grey-level volume")
    if np.iscomplexobj(a):
        raise VolumeError(f"{name}: complex voxels are not supported; give a magnitude image")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.number)):
        raise VolumeError(f"{name}: voxel type {a.dtype} is not an intensity image")
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise VolumeError(
            f"{name}: expected a 3-D volume (or a 2-D image), got {a.ndim}-D data of shape {tuple(a.shape)}"
            + ("; split 4-D series into 3-D volumes first" if a.ndim == 4 else "")
        )
    if min(a.shape) < 1 or a.size == 0:
        raise VolumeError(f"{name}: the volume is empty (shape {tuple(a.shape)})")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise VolumeError(f"{name}: in-plane size {a.shape[:2]} is too small to be an image")
    a = a.astype(np.float32, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        n_bad = int(a.size - finite.sum())
        raise VolumeError(f"{name}: {n_bad} voxels are NaN or infinite; fix or mask them before detection")
    return a


def _check_header_shape(shape, name: str) -> None:
    dims = [int(s) for s in shape]
    if any(d <= 0 for d in dims):
        raise VolumeError(f"{name}: header declares an empty shape {tuple(dims)}")
    if any(d > MAX_SIDE for d in dims) or int(np.prod(dims, dtype=np.float64)) > MAX_VOXELS:
        raise VolumeError(
            f"{name}: header declares an absurd size {tuple(dims)} (limit {MAX_SIDE} per side, {MAX_VOXELS} voxels); "
            "the file is corrupt or not a medical volume"
        )


def _load_nifti(path: Path, name: str) -> Volume:
    try:
        img = nib.load(str(path))
    except Exception as e:
        raise VolumeError(f"{name}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    _check_header_shape(img.shape, name)
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as e:
        raise VolumeError(f"{name}: the file is truncated or corrupt; its voxel data could not be read ({e})") from e
    affine = img.affine if img.affine is not None else np.eye(4)
    return Volume(validate_array(data, name), np.asarray(affine, dtype=np.float64), str(path))


def _nrrd_affine(header: dict) -> np.ndarray:
    dirs = header.get("space directions")
    origin = header.get("space origin")
    aff = np.eye(4)
    if dirs is not None:
        d = np.array([row for row in dirs if row is not None and not np.all(np.isnan(np.asarray(row, float)))], float)
        if d.shape == (3, 3):
            aff[:3, :3] = d.T
    if origin is not None:
        aff[:3, 3] = np.asarray(origin, float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        aff = _LPS @ aff
    return aff


def _load_nrrd(path: Path, name: str) -> Volume:
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as e:
        raise VolumeError(f"{name}: not a readable NRRD file ({type(e).__name__}: {e})") from e
    _check_header_shape(header.get("sizes", []), name)
    try:
        data, header = nrrd.read(str(path))
    except Exception as e:
        raise VolumeError(f"{name}: the NRRD voxel data is truncated or corrupt ({type(e).__name__}: {e})") from e
    return Volume(validate_array(data, name), _nrrd_affine(header), str(path))


def load_volume(path: Union[str, Path], name: Optional[str] = None) -> Volume:
    """Read a .nii/.nii.gz/.nrrd/.nhdr volume; raise VolumeError naming ``name`` (default: the path)."""
    path = Path(path)
    name = name or str(path)
    if not path.exists():
        raise VolumeError(f"{name}: no such file")
    if not path.is_file():
        raise VolumeError(f"{name}: not a file")
    if path.stat().st_size == 0:
        raise VolumeError(f"{name}: the file is empty")
    low = path.name.lower()
    if low.endswith((".nii", ".nii.gz")):
        return _load_nifti(path, name)
    if low.endswith((".nrrd", ".nhdr")):
        return _load_nrrd(path, name)
    raise VolumeError(f"{name}: unsupported file type; give a .nii, .nii.gz or .nrrd volume")


def save_volume(array: np.ndarray, affine: np.ndarray, path: Union[str, Path], dtype=np.float32) -> Path:
    """Write a NIfTI (.nii/.nii.gz) or NRRD (.nrrd, LPS space and gzip, as 3D Slicer writes and expects) volume
    atomically (temporary file + rename). Voxels are stored as ``dtype``: float32 for heatmaps, ``np.uint8`` for
    label maps."""
    path = Path(path)
    low = path.name.lower()
    arr = np.ascontiguousarray(array, dtype=dtype)
    affine = np.asarray(affine, dtype=np.float64)
    if low.endswith((".nii.gz", ".nii")):
        img = nib.Nifti1Image(arr, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        with atomic_path(path, suffix=".nii.gz" if low.endswith(".gz") else ".nii") as tmp:
            nib.save(img, str(tmp))
    elif low.endswith(".nrrd"):
        import nrrd

        lps = _LPS @ affine
        header = {  # pynrrd sets the voxel type from the array
            "dimension": arr.ndim, "space": "left-posterior-superior",
            "space directions": lps[:3, :3].T.tolist(), "space origin": lps[:3, 3].tolist(),
            "kinds": ["domain"] * arr.ndim, "encoding": "gzip",
        }
        with atomic_path(path, suffix=".nrrd") as tmp:
            nrrd.write(str(tmp), arr, header)
    else:
        raise VolumeError(f"{path}: cannot write this file type; use .nii.gz, .nii or .nrrd")
    return path


# ---------------------------------------------------------------------------------------------------------------
# volume <-> slices


@dataclass
class CanonicalVolume:
    """A volume in closest-canonical RAS voxel order, plus what is needed to map results back."""

    array: np.ndarray  # (X', Y', Z') float32, RAS-ordered axes
    ornt: np.ndarray  # nibabel orientation of the file's voxel axes (io_orientation of its affine)
    spacing: np.ndarray  # (3,) voxel sizes in mm along the RAS-ordered axes (1 where the affine gives none)

    def spacing_slice_first(self, slice_axis: int) -> np.ndarray:
        """Voxel sizes in the order the detector works in: ``slice_axis`` first, then the other two."""
        return np.concatenate([self.spacing[[slice_axis]], np.delete(self.spacing, slice_axis)])

    def to_file_order(self, data: np.ndarray) -> np.ndarray:
        """Map an array on the RAS-ordered grid back to the file's voxel order."""
        inv = orientations.ornt_transform(orientations.axcodes2ornt(("R", "A", "S")), self.ornt)
        return np.ascontiguousarray(orientations.apply_orientation(data, inv))


def to_canonical(array: np.ndarray, affine: Optional[np.ndarray]) -> CanonicalVolume:
    """Reorder/flip voxel axes so that axis 0,1,2 run towards R, A, S (no resampling)."""
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any():  # degenerate affine: keep the voxel order
        ornt = orientations.axcodes2ornt(("R", "A", "S"))
    to_ras = orientations.ornt_transform(ornt, orientations.axcodes2ornt(("R", "A", "S")))
    arr = np.ascontiguousarray(orientations.apply_orientation(array, to_ras))
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = np.where(sizes > 0, sizes, 1.0)
    return CanonicalVolume(arr, ornt, spacing)


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

