"""Volumes in and out: reading NIfTI, NRRD and 2-D images (PNG, JPEG, single DICOM files) with clear errors, atomic
writing, volume file names and ids.

The one place that touches volume files (a future home for DICOM series too); what the detector does to a volume
once read (canonical grid, intensity scaling, slice batches) is ``spmamba.preprocessing``'s.

2-D images (an X-ray, a colonoscopy frame) are volumes with one slice: ``array`` (columns, rows, 1) and the affine
ITK gives them (PNG/JPEG: 1 mm pixels, origin 0, first axis towards patient left, second towards posterior, i.e.
voxel (i, j, 0) -> RAS (-i, -j, 0); DICOM: its pixel spacing, position and orientation), so a heatmap written with
that affine lies on the image wherever ITK-based viewers (3D Slicer) open it. Colour images are read as grey
(luminance, ITU-R 601 weights; alpha dropped); DICOM MONOCHROME1 images arrive inverted by ITK (GDCM), so bright
means dense as in MONOCHROME2. DICOM pixel sizes are GDCM's (for DX/CR it reads Imager Pixel Spacing; 1 mm when
absent).
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import nibabel as nib
import numpy as np

from spmamba.atomic import atomic_path

__all__ = [
    "VolumeError", "Volume", "load_volume", "validate_array", "save_volume", "volume_id", "volume_suffix",
    "is_volume_file", "VOLUME_SUFFIXES", "IMAGE_SUFFIXES", "SUPPORTED_FILES",
]

#: 2-D image files read as volumes with one slice (PNG/JPEG: 8- or 16-bit grey or colour; DICOM: one file)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
#: the volume files the library reads (``.nhdr``: a detached NRRD header beside its data file), longest first
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr") + IMAGE_SUFFIXES
#: the readable file types, for messages
SUPPORTED_FILES = ".nii, .nii.gz, .nrrd, .png, .jpg or .dcm"
MAX_VOXELS = 1024 ** 3 // 2  # 512 M voxels (2 GB as float32): beyond this a header is treated as absurd
MAX_SIDE = 8192
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


#: luminance weights of colour images (ITU-R BT.601, as PIL's "L" mode)
_LUMA = (0.299, 0.587, 0.114)


def _itk_affine(spacing, origin, direction) -> np.ndarray:
    """ITK geometry (LPS world; 2-D or 3-D) -> a (4, 4) voxel -> RAS affine for (X, Y, Z) arrays. A 2-D image's third
    axis is ITK's: 1 mm along the cross product of its in-plane axes (+z for the usual identity direction)."""
    dim = len(spacing)
    d = np.asarray(direction, dtype=np.float64).reshape(dim, dim)
    if dim == 2:
        d3 = np.eye(3)
        d3[:2, :2] = d
        d = d3
        spacing, origin = tuple(spacing) + (1.0,), tuple(origin) + (0.0,)
    aff = np.eye(4)
    aff[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    aff[:3, 3] = origin
    return _LPS @ aff


def _load_image2d(path: Path, name: str) -> Volume:
    """PNG/JPEG/DICOM through SimpleITK (ITK's geometry, so viewers built on ITK put the heatmap on the image)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        kind = "DICOM" if path.name.lower().endswith(".dcm") else "image"
        raise VolumeError(f"{name}: not a readable {kind} file ({str(e).strip().splitlines()[-1][:200]})") from e
    _check_header_shape(reader.GetSize(), name)
    if path.name.lower().endswith((".jpg", ".jpeg")):  # libjpeg fills a truncated file with grey and only warns
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise VolumeError(f"{name}: the JPEG data is truncated or corrupt ({e})") from e
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise VolumeError(f"{name}: the image data is truncated or corrupt ({str(e).strip().splitlines()[-1][:200]})"
                          ) from e
    arr = sitk.GetArrayFromImage(img)  # (rows, cols[, components]) or (frames, rows, cols[, components])
    comps = img.GetNumberOfComponentsPerPixel()
    if comps > 1:  # colour: grey by luminance (RGB or RGBA; other vector images by their mean)
        arr = arr.astype(np.float32)
        arr = (arr[..., :3] @ np.asarray(_LUMA, np.float32)) if comps in (3, 4) else arr.mean(-1)
    arr = np.asarray(arr).T  # ITK arrays are (z, y, x): the library's are (x, y, z)
    return Volume(validate_array(arr, name), _itk_affine(img.GetSpacing(), img.GetOrigin(), img.GetDirection()),
                  str(path))


def load_volume(path: Union[str, Path], name: Optional[str] = None) -> Volume:
    """Read a .nii/.nii.gz/.nrrd/.nhdr volume or a 2-D .png/.jpg/.jpeg/.dcm image (a volume with one slice); raise
    VolumeError naming ``name`` (default: the path)."""
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
    if low.endswith(IMAGE_SUFFIXES):
        return _load_image2d(path, name)
    raise VolumeError(f"{name}: unsupported file type; give a {SUPPORTED_FILES} file")


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
        raise VolumeError(f"{path}: cannot write this file type; use .nii.gz, .nii or .nrrd (2-D images included: "
                          "a heatmap keeps the image's geometry)")
    return path
