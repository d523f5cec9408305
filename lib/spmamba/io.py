"""Volumes in and out: reading NIfTI, NRRD, DICOM series and 2-D images (PNG, JPEG, single DICOM files) with clear
errors, atomic writing, volume file names and ids.

The one place that reads volume files; what the detector does to a volume once read (canonical grid, intensity
scaling, slice batches) is ``spmamba.preprocessing``'s.

A DICOM series is a folder that holds the files of one cross-sectional image series (CT, MR, PET, NM;
``load_volume(folder)``): the headers are checked first with pydicom (one series, image objects only, one slice size
and orientation, evenly spaced slices), then the voxels are read with SimpleITK's GDCM reader (as MONAI Label's own
DICOM conversion does), with the rescale slope and intercept applied. One file of such a series is refused (give the
folder); a single DICOM file that is an image of its own (an X-ray, a one-slice or multi-frame image) is read as it is.

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
    "is_volume_file", "VOLUME_SUFFIXES", "IMAGE_SUFFIXES", "SUPPORTED_FILES", "DicomSeries", "inspect_dicom_series",
    "load_dicom_series", "is_dicom_folder", "is_dicom_file", "IMAGE_SOP_CLASSES",
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
    """Read a .nii/.nii.gz/.nrrd/.nhdr volume, a folder holding one DICOM image series (:func:`load_dicom_series`)
    or a 2-D .png/.jpg/.jpeg image or single DICOM image file (a volume with one slice, or a multi-frame image); raise
    VolumeError naming ``name`` (default: the path)."""
    path = Path(path)
    name = name or str(path)
    if not path.exists():
        raise VolumeError(f"{name}: no such file")
    if path.is_dir():
        return load_dicom_series(path, name)
    if not path.is_file():
        raise VolumeError(f"{name}: not a file")
    if path.stat().st_size == 0:
        raise VolumeError(f"{name}: the file is empty")
    low = path.name.lower()
    if low.endswith((".nii", ".nii.gz")):
        return _load_nifti(path, name)
    if low.endswith((".nrrd", ".nhdr")):
        return _load_nrrd(path, name)
    if is_dicom_file(path):
        _refuse_series_slice(path, name)
        return _load_image2d(path, name)
    if low.endswith(IMAGE_SUFFIXES):
        return _load_image2d(path, name)
    raise VolumeError(f"{name}: unsupported file type; give a {SUPPORTED_FILES} file or a DICOM series folder")


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


# ---------------------------------------------------------------------------------------------------------------
# DICOM series
# ---------------------------------------------------------------------------------------------------------------
#: SOP classes of the images a volume can be made of (CT, MR, PET, NM: classic, enhanced and legacy-converted);
#: anything else in a series folder (Segmentation, Parametric Map, structured reports, presentation states, ...)
#: is not an image of the patient and is refused.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.20": "Nuclear Medicine Image Storage",
}
#: relative spread of the gaps between neighbouring slices beyond which a series is refused (a missing slice)
SLICE_GAP_TOLERANCE = 0.05


def sop_class_name(uid: str) -> str:
    """A readable name of a DICOM SOP class UID (pydicom's dictionary), or the UID itself."""
    try:
        from pydicom.uid import UID

        name = UID(str(uid)).name
    except Exception:  # noqa: BLE001 - any odd value: show it as it is
        return str(uid)
    return name or str(uid)


def is_dicom_file(path: Union[str, Path]) -> bool:
    """Whether ``path`` starts like a DICOM Part 10 file (128-byte preamble + ``DICM``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _dicom_header(path: Union[str, Path]):
    """The header of a DICOM file (no pixel data), or None when pydicom cannot read one."""
    try:
        import pydicom

        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - any unreadable file: not a DICOM object for this purpose
        return None


def _is_cross_sectional(ds) -> bool:
    """Whether a DICOM header is a slice or frames of a cross-sectional volume (:data:`IMAGE_SOP_CLASSES`)."""
    return ds is not None and str(ds.get("SOPClassUID", "")) in IMAGE_SOP_CLASSES


def is_dicom_folder(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a DICOM series folder: DICOM files directly inside, no other volume or image files, and
    at least one of them a cross-sectional image (CT, MR, PET, NM). A folder of DICOM X-rays or other 2-D images is
    not a series folder: each file there is a study of its own."""
    p = Path(path)
    if not p.is_dir():
        return False
    dicoms = []
    for q in sorted(p.iterdir()):
        if q.name.startswith(".") or not q.is_file():
            continue
        if is_dicom_file(q):
            dicoms.append(q)
        elif is_volume_file(q):
            return False
    return any(_is_cross_sectional(_dicom_header(q)) for q in dicoms)


def _refuse_series_slice(path: Path, name: str) -> None:
    """Raise VolumeError when a single DICOM file is one slice of a multi-file cross-sectional series (its folder
    holds other files of the same series): one slice is not the volume the user means."""
    ds = _dicom_header(path)
    if not _is_cross_sectional(ds) or int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return
    series = str(ds.get("SeriesInstanceUID", ""))
    siblings = 0
    for q in path.parent.iterdir():
        if q == path or q.name.startswith(".") or not q.is_file() or not is_dicom_file(q):
            continue
        other = _dicom_header(q)
        siblings += other is not None and str(other.get("SeriesInstanceUID", "")) == series
    if siblings:
        raise VolumeError(f"{name}: a single DICOM file, one slice of a {ds.get('Modality', '')} series of "
                          f"{siblings + 1} files; give the folder that holds the whole series ({path.parent})")


@dataclass
class DicomSeries:
    """What :func:`inspect_dicom_series` found: one image series, its files sorted along the slice normal."""

    folder: str
    files: list  # paths, sorted by position along the slice normal (one file for a multi-frame image)
    series_uid: str
    study_uid: str
    sop_class_uid: str
    modality: str
    description: str
    rows: int
    columns: int
    ignored: list  # files that are not DICOM (skipped)

    @property
    def sop_class(self) -> str:
        return sop_class_name(self.sop_class_uid)


def _describe_groups(groups: dict) -> str:
    parts = []
    for key, items in list(groups.items())[:5]:
        parts.append(f"{key} ({len(items)} file{'s' if len(items) != 1 else ''})")
    return "; ".join(parts) + (f"; and {len(groups) - 5} more" if len(groups) > 5 else "")


def inspect_dicom_series(folder: Union[str, Path], name: Optional[str] = None) -> DicomSeries:
    """Check the DICOM headers in ``folder`` (no voxel data is read) and return the one image series it holds.

    Raises :class:`VolumeError` naming ``name`` when the folder has no DICOM file, holds non-image objects
    (Segmentation, Parametric Map, reports ...) or several series, or its slices do not make one volume (different
    sizes or orientations, missing positions, slices at the same position, uneven gaps)."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as e:  # pragma: no cover - a pinned dependency
        raise VolumeError(f"{name or folder}: reading DICOM needs pydicom (pip install 'pydicom<3')") from e
    folder = Path(folder)
    name = name or str(folder)
    headers, ignored = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError):
            ignored.append(str(p))
            continue
        if "SOPClassUID" not in ds:  # a DICOMDIR or another file without an object in it
            ignored.append(str(p))
            continue
        headers.append((str(p), ds))
    if not headers:
        raise VolumeError(f"{name}: no DICOM files found; give a folder that holds the files of one DICOM image "
                          "series")
    non_image: dict = {}
    for path, ds in headers:
        uid = str(ds.SOPClassUID)
        if uid not in IMAGE_SOP_CLASSES:
            non_image.setdefault(sop_class_name(uid), []).append(path)
    if non_image:
        raise VolumeError(f"{name}: holds DICOM objects that are not images: {_describe_groups(non_image)}. A DICOM "
                          "volume folder must hold one image series only (CT, MR, PET or NM): move the others out")
    series: dict = {}
    for path, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "?")), []).append((path, ds))
    if len(series) > 1:
        labels = {f"{uid} '{items[0][1].get('SeriesDescription', '')}'": items for uid, items in series.items()}
        raise VolumeError(f"{name}: holds {len(series)} DICOM series: {_describe_groups(labels)}. Put each series "
                          "in its own folder and give one folder per volume")
    (series_uid, items), = series.items()
    first = items[0][1]
    sizes: dict = {}
    for path, ds in items:
        sizes.setdefault(f"{ds.get('Rows', '?')}x{ds.get('Columns', '?')}", []).append(path)
    if len(sizes) > 1:
        raise VolumeError(f"{name}: its slices have different sizes ({_describe_groups(sizes)}); a volume needs one "
                          "slice size: the series is damaged or mixes several acquisitions")
    multiframe = int(first.get("NumberOfFrames", 1) or 1) > 1
    files = [path for path, _ in items]
    if multiframe:
        if len(items) > 1:
            raise VolumeError(f"{name}: holds {len(items)} multi-frame images of one series; give one multi-frame "
                              "image per folder")
    elif len(items) > 1:
        files = _sorted_slices(items, name)
    return DicomSeries(str(folder), files, series_uid, str(first.get("StudyInstanceUID", "")),
                       str(first.SOPClassUID), str(first.get("Modality", "")),
                       str(first.get("SeriesDescription", "")), int(first.get("Rows", 0) or 0),
                       int(first.get("Columns", 0) or 0), ignored)


def _sorted_slices(items: list, name: str) -> list:
    """The files of single-frame slices sorted along the slice normal; refuses what is not one evenly spaced
    volume."""
    orientations, positions = [], []
    for path, ds in items:
        iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
        if iop is None or ipp is None or len(iop) != 6 or len(ipp) != 3:
            raise VolumeError(f"{name}: {Path(path).name} has no ImagePositionPatient/ImageOrientationPatient, so "
                              "its slices cannot be placed in a volume")
        orientations.append(np.asarray([float(v) for v in iop]))
        positions.append(np.asarray([float(v) for v in ipp]))
    iop0 = orientations[0]
    if any(np.abs(o - iop0).max() > 1e-4 for o in orientations):
        raise VolumeError(f"{name}: its slices have different orientations; a volume needs parallel slices (a "
                          "localiser or a mixed series?)")
    normal = np.cross(iop0[:3], iop0[3:])
    depth = np.asarray([float(p @ normal) for p in positions])
    order = np.argsort(depth, kind="stable")
    gaps = np.diff(depth[order])
    if np.any(gaps < 1e-3):
        n = int(np.sum(gaps < 1e-3))
        raise VolumeError(f"{name}: {n + 1} slices share a position; this looks like a 4-D, multi-echo or "
                          "duplicated series: split it into one folder per volume")
    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > SLICE_GAP_TOLERANCE * median:
        raise VolumeError(f"{name}: its slices are not evenly spaced (gaps from {gaps.min():.3g} to "
                          f"{gaps.max():.3g} mm): a slice is missing or the series mixes acquisitions")
    return [items[i][0] for i in order]


def load_dicom_series(folder: Union[str, Path], name: Optional[str] = None) -> Volume:
    """Read the DICOM image series in ``folder`` as one volume (float32 (X, Y, Z), voxel -> RAS affine; X runs
    along a row (columns), Y along a column (rows), Z along the slice normal). The headers are checked first
    (:func:`inspect_dicom_series`); the voxels, with rescale slope and intercept, are read by SimpleITK."""
    folder = Path(folder)
    name = name or str(folder)
    if not folder.is_dir():
        raise VolumeError(f"{name}: not a folder")
    series = inspect_dicom_series(folder, name)
    try:
        import SimpleITK as sitk
    except ImportError as e:  # pragma: no cover - a pinned dependency
        raise VolumeError(f"{name}: reading DICOM needs SimpleITK (pip install SimpleITK)") from e
    from spmamba.registration import from_sitk

    try:
        if len(series.files) == 1:
            reader = sitk.ImageFileReader()
            reader.SetImageIO("GDCMImageIO")
            reader.SetFileName(series.files[0])
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetImageIO("GDCMImageIO")
            reader.SetFileNames(series.files)
        image = reader.Execute()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VolumeError(f"{name}: the voxel data of the DICOM series could not be read ({first}); the files are "
                          "truncated, or compressed in a way this installation cannot decode") from e
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{name}: colour (RGB) DICOM images are not supported; give a grey-level series")
    array, affine = from_sitk(image)
    return Volume(validate_array(array, name), affine, str(folder))
