"""Anatomical alignment: affine registration of every volume to one reference, and back.

SP-Mamba's position-specific prototypes and position-aware normalisation compare the same anatomy at the same
voxel; that only holds once scans share one space. This module registers a volume to a reference image with
SimpleITK (a maintained ITK registration framework; no optimiser of our own) and maps results back:

- :class:`Reference`: the target image (intensity-normalised, float32, RAS voxel order) and its grid. Made from
  the normal training set (:func:`build_reference`: the median-sized normal, then the mean of all normals
  affinely aligned to it), from the MNI152 2009a template nilearn ships (:func:`mni152_reference`, skull-stripped,
  for brain MRI) or from a file (:func:`reference_from_file`).
- :class:`AffineAligner`: the registration settings plus the failure checks, stored in a model file
  (:meth:`AffineAligner.to_payload`). :meth:`AffineAligner.align` registers one volume and returns an
  :class:`Alignment`: the volume resampled onto the reference grid, the transform, the similarity and the scales.
  :meth:`Alignment.to_input` resamples a map from the reference grid back onto the input's own grid.
- :class:`AlignmentError` (a :class:`~spmamba.io.VolumeError`): a volume that cannot be aligned (empty or
  constant, a sheared voxel grid) or whose registration failed or diverged (similarity below the floor, absurd
  scale, reflection). Never silently used: the detector raises it, the CLI reports and skips that volume.

Registration (repeatable bit for bit: fixed seed, single-threaded ITK): both images intensity-normalised
(``preprocessing.normalise_intensity``); centred
moments initialiser; a coarse search of the starting rotation (a 5x5x5 grid, -30..30 deg about each axis, at 1/4
resolution); 12-parameter affine (rotation, translation, scale, shear); Mattes mutual information with
random sampling of a fixed fraction of the voxels inside the reference's (dilated) foreground, fixed seed;
regular-step gradient descent with scales from physical shift; three resolutions (shrink 4/2/1, smoothing 2/1/0
voxels), bounded iterations.

Deformable stage (``AffineAligner(deformable=True)``, ``method`` "deformable"; what ``auto`` does for brains): the
affine stage leaves the non-linear differences between subjects (2-5 mm on the unregistered phantoms), so a voxel of
one subject still sits beside other anatomy of the normals; after it the volume on the reference grid is
histogram-matched to the reference and registered to it with diffeomorphic demons (SimpleITK; two resolutions, the
displacement field smoothed with a Gaussian of ``demons_sigma``). The full transform is the displacement field, then
the affine one; maps go back through its inverse (the field inverted iteratively on the reference grid). A field
that folds the brain or moves it absurdly far is not used for that volume (it keeps its affine alignment).

Coordinates: nibabel affines map voxels to RAS mm, SimpleITK works in LPS mm; :func:`to_sitk` / :func:`from_sitk`
are the one place that converts. A SimpleITK registration transform maps points of the fixed image (the
reference) to points of the moving image (the input): the input is resampled onto the reference grid with it, and
a reference-grid map goes back onto the input grid with its inverse (linear interpolation; input voxels outside
the reference grid get ``fill``, 0 by default, the minimum of every heatmap).

Failure checks (per volume): the similarity is the Pearson correlation of the two intensity-normalised images on
the reference grid, over the union of their foregrounds, leaving out the 5% of voxels that differ most (so a
lesion does not make an abnormal scan look misaligned) (1 = identical, about 0.9 for well-aligned phantoms of
different subjects; a misregistration leaves brain over background and drops it). It must reach
``metric_floor``, calibrated on the training normals (their lowest similarity minus ``FLOOR_MARGIN``, never
below ``ABSOLUTE_FLOOR``); the singular values of the transform's linear part must lie in ``scale_range``
(default 0.6-1.6) and its determinant must be positive.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .io import Volume, VolumeError, load_volume, validate_array
from .preprocessing import normalise_intensity, to_canonical

__all__ = [
    "AlignmentError", "Reference", "Alignment", "AffineAligner", "ALIGN_METHODS", "DEFAULT_ALIGN", "REFERENCE_KINDS",
    "to_sitk", "from_sitk", "build_reference", "mni152_reference", "reference_from_file", "make_reference",
    "similarity", "ABSOLUTE_FLOOR", "FLOOR_MARGIN", "calibrate_floor",
]

ALIGN_METHODS = ("none", "affine", "deformable", "auto")  # auto: deformable to MNI152 for brains that fit it, else none
DEFAULT_ALIGN = "auto"  # what `spmamba train` and the app do for a new model
REFERENCE_KINDS = ("auto", "normals", "mni152")  # or a path to a volume file
ABSOLUTE_FLOOR = 0.5  # no alignment with a lower similarity is ever accepted
FLOOR_MARGIN = 0.1  # floor = lowest similarity of the training normals minus this
TRIM = 0.05  # share of the most different voxels the similarity leaves out (lesions, see similarity())
_LPS = np.diag([-1.0, -1.0, 1.0])
_MIN_FOREGROUND_VOXELS = 500


class AlignmentError(VolumeError):
    """A volume that could not be aligned to the reference; the message names it, says why and what to do."""


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as e:  # pragma: no cover - a pinned dependency
        raise RuntimeError("alignment needs SimpleITK (pip install SimpleITK)") from e
    return sitk


_ONE_ITK_THREAD = threading.Lock()


@contextlib.contextmanager
def _repeatable_registration():
    """Run ITK single-threaded inside: the same scan then gets the same transform, run after run.

    ITK's threaded Mattes mutual information adds its partial sums in no fixed order, and the registration method's
    own thread count does not reach every filter it runs; only the global default does (measured on 2 cores: the
    affine matrix moved by 1e-3 between runs in one process, 0 with this, at the same speed, 2.0-2.6 s against
    2.3 s per volume). The lock keeps two registrations in one process from restoring each other's setting; other
    ITK work running meanwhile is single-threaded too, a slowdown only."""
    sitk = _sitk()
    with _ONE_ITK_THREAD:
        before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


# ---------------------------------------------------------------------------------------------------------------
# numpy + RAS affine <-> SimpleITK image


def to_sitk(array: np.ndarray, affine: Optional[np.ndarray], name: str = "volume"):
    """(X, Y, Z) array + voxel->RAS affine -> sitk.Image (LPS physical space) with the same voxels and geometry.

    SimpleITK needs an orthogonal voxel grid (spacing x direction); an affine with shear raises AlignmentError."""
    sitk = _sitk()
    a = np.asarray(array)
    if a.ndim != 3:
        raise AlignmentError(f"{name}: alignment needs a 3-D volume, got shape {a.shape}")
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    m = _LPS @ aff[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(m)) < 1e-12:
        raise AlignmentError(f"{name}: its affine is degenerate (zero voxel size); fix the header")
    direction = m / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise AlignmentError(f"{name}: its voxel grid is sheared; resample it onto an orthogonal grid before "
                             "aligning")
    img = sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction.ravel()])
    img.SetOrigin([float(v) for v in _LPS @ aff[:3, 3]])
    return img


def from_sitk(image) -> tuple[np.ndarray, np.ndarray]:
    """sitk.Image -> ((X, Y, Z) array, voxel->RAS affine); the inverse of :func:`to_sitk`."""
    sitk = _sitk()
    arr = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = _LPS @ direction @ np.diag(image.GetSpacing())
    aff[:3, 3] = _LPS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return np.ascontiguousarray(arr), aff


def _transform_matrix_ras(transform) -> np.ndarray:
    """4x4 matrix of an sitk affine-like transform, converted from LPS to RAS points."""
    a = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), dtype=np.float64)
    t = np.asarray(transform.GetTranslation(), dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = t + c - a @ c
    f = np.diag([-1.0, -1.0, 1.0, 1.0])
    return f @ m @ f


# ---------------------------------------------------------------------------------------------------------------
# references


@dataclass
class Reference:
    """The image every volume is aligned to: intensity-normalised float32 (foreground ~[0, 1], background 0) in
    RAS voxel order, its voxel->RAS affine and a name ("normals", "mni152" or a file name)."""

    array: np.ndarray
    affine: np.ndarray
    name: str

    def __post_init__(self) -> None:
        # kept at the precision the model file stores (float16), so a loaded model registers exactly as the
        # trained one did
        self.array = np.asarray(self.array, dtype=np.float16).astype(np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    def foreground(self) -> np.ndarray:
        return self.array > 0.1

    def to_payload(self) -> tuple[dict, Any]:
        """(plain metadata, float16 tensor of the image) for a checkpoint (``torch.load(weights_only=True)``)."""
        import torch

        meta = {"name": self.name, "affine": np.asarray(self.affine, float).tolist(), "shape": list(self.shape)}
        return meta, torch.from_numpy(np.asarray(self.array, dtype=np.float16).copy())

    @classmethod
    def from_payload(cls, meta: dict, tensor: Any) -> "Reference":
        arr = np.asarray(tensor.float().numpy() if hasattr(tensor, "numpy") else tensor, dtype=np.float32)
        return cls(arr, np.asarray(meta["affine"], dtype=np.float64), str(meta.get("name", "reference")))


def _reference_image(array: np.ndarray, affine: Optional[np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """A volume as a reference image: RAS voxel order (no resampling), intensity-normalised to ~[0, 1] with the
    background at 0."""
    from nibabel import orientations

    arr = validate_array(array, name)
    canon = to_canonical(arr, affine)
    aff = np.asarray(affine, dtype=np.float64) if affine is not None else np.eye(4)
    # the affine of the reoriented array: the same world positions, indexed in RAS order
    to_ras = orientations.ornt_transform(canon.ornt, orientations.axcodes2ornt(("R", "A", "S")))
    ras_aff = aff @ orientations.inv_ornt_aff(to_ras, arr.shape)
    norm, fg = _normalised(canon.array, name)
    return np.where(fg, np.minimum(norm, 1.5), 0.0).astype(np.float32), ras_aff


def _normalised(array: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-normalised image and foreground; AlignmentError for empty or constant volumes."""
    a = np.asarray(array, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        raise AlignmentError(f"{name}: the volume is constant ({lo:g} everywhere); there is no anatomy to align. "
                             "Check the file, or use a model trained with --align none")
    norm, fg = normalise_intensity(a)
    n_fg = int(fg.sum())
    if n_fg < _MIN_FOREGROUND_VOXELS:
        raise AlignmentError(f"{name}: only {n_fg} foreground voxels; the volume looks empty and cannot be aligned "
                             "(check the file, or use a model trained with --align none)")
    if float(norm[fg].std()) < 1e-3:  # a uniform foreground (a mask, a blob): its outline is all there is
        norm = fg.astype(np.float32)
    return norm, fg


def mni152_reference(spacing: float = 2.0) -> Reference:
    """The skull-stripped MNI152 2009a T1 template nilearn ships (no download), on its brain bounding box plus a
    14 mm margin at ``spacing`` mm (the grid of the synthetic phantoms). For skull-stripped brain MRI."""
    sitk = _sitk()
    from .data.synthetic import load_template

    tpl = load_template(float(spacing))
    src = to_sitk(tpl.maps[0], tpl.src_affine, "MNI152 template")
    grid = to_sitk(np.zeros(tpl.shape, np.float32), tpl.affine, "MNI152 grid")
    arr, aff = from_sitk(sitk.Resample(src, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    norm, fg = _normalised(arr, "MNI152 template")
    return Reference(np.where(fg, np.minimum(norm, 1.5), 0.0).astype(np.float32), aff, "mni152")


def reference_from_file(path: Union[str, Path]) -> Reference:
    """A reference read from a volume file (any anatomy; the grid of the file, reoriented to RAS order)."""
    vol = load_volume(path)
    arr, aff = _reference_image(vol.array, vol.affine, str(path))
    return Reference(arr, aff, Path(path).name)


def build_reference(volumes: Sequence[Volume], aligner: Optional["AffineAligner"] = None,
                    progress: Optional[Callable[[int, int], None]] = None) -> Reference:
    """A reference from normal volumes: start from the normal whose foreground volume (mm^3) is the median (a
    typical subject, on its own grid in RAS order), align every normal to it affinely and average the
    intensity-normalised, aligned images. Failures are raised (AlignmentError naming the volume)."""
    if len(volumes) < 1:
        raise ValueError("build_reference needs at least one volume")
    sizes = []
    for i, v in enumerate(volumes):
        name = _name(v, i)
        _, fg = _normalised(v.array, name)
        sizes.append(fg.sum() * float(np.prod(v.spacing)))
    start = int(np.argsort(sizes)[len(sizes) // 2])
    arr, aff = _reference_image(volumes[start].array, volumes[start].affine, _name(volumes[start], start))
    if len(volumes) == 1:
        return Reference(arr, aff, "normals")
    aligner = (aligner or AffineAligner(Reference(arr, aff, "normals"))).with_reference(Reference(arr, aff, "normals"))
    total = np.zeros(arr.shape, np.float64)
    used, failed = 0, []
    for i, v in enumerate(volumes):
        try:
            al = aligner.align(v.array, v.affine, name=_name(v, i), check_floor=False)
        except AlignmentError as e:  # an odd normal is left out of the mean (reported), a few at most
            failed.append(str(e))
            if len(failed) > 0.2 * len(volumes):
                raise AlignmentError(f"{len(failed)} of {len(volumes)} normals fail to align to the typical one "
                                     f"(e.g. {failed[0]})") from e
            continue
        norm, fg = _normalised(al.array, _name(v, i))
        total += np.where(fg, np.minimum(norm, 1.5), 0.0)
        used += 1
        if progress is not None:
            progress(i + 1, len(volumes))
    if failed:
        import logging

        logging.getLogger(__name__).warning("left out of the reference: %s", "; ".join(failed))
    return Reference((total / used).astype(np.float32), aff, "normals")


def auto_spacing(volumes: Sequence[Volume]) -> float:
    """The grid spacing (mm) of an automatic MNI152 reference: the normals' median voxel size, at least 2 mm (the
    working resolution of the CPU presets) and at most 8 mm."""
    sizes = [float(np.mean(np.sqrt((np.asarray(v.affine, float)[:3, :3] ** 2).sum(0)))) for v in volumes]
    return float(np.clip(np.median(sizes) if sizes else 2.0, 2.0, 8.0))


def mni152_fits(volumes: Sequence[Volume], aligner: Optional["AffineAligner"] = None, n: int = 3,
                spacing: float = 2.0) -> bool:
    """Whether the MNI152 brain template suits these normals: ``n`` of them, spread over the set, register to it
    (at ``spacing`` mm) with a similarity above ``ABSOLUTE_FLOOR``. Against a template, registration of
    scanner-placed brains is more accurate than subject to subject (measured: 1-2 mm vs 6-9 mm mean error on the
    unregistered phantoms); any other anatomy (or a non-brain, a 2-D image) fails this test."""
    import logging

    log = logging.getLogger(__name__)
    if not volumes:
        return False
    if any(np.ndim(v.array) != 3 or min(np.shape(v.array)) < 8 for v in volumes):
        log.info("the normals are not 3-D volumes of at least 8 voxels per axis: no MNI152 template")
        return False
    try:
        ref = mni152_reference(spacing)
    except Exception as e:  # noqa: BLE001 - nilearn missing or its files unreadable: the normals it is
        log.info("MNI152 template not available (%s); reference from the normals", e)
        return False
    al = (aligner or AffineAligner(ref)).with_reference(ref)
    picks = sorted({int(round(i)) for i in np.linspace(0, len(volumes) - 1, min(n, len(volumes)))})
    for i in picks:
        try:
            al.align(volumes[i].array, volumes[i].affine, name=_name(volumes[i], i), check_floor=False)
        except VolumeError as e:  # AlignmentError, or a volume registration cannot take
            log.info("the normals do not fit the MNI152 template (%s)", e)
            return False
    return True


def make_reference(kind: Union[str, Path], volumes: Sequence[Volume] = (), aligner: Optional["AffineAligner"] = None,
                   progress: Optional[Callable[[int, int], None]] = None) -> Reference:
    """``kind``: "normals" (from ``volumes``), "mni152" / "mni152:SPACING", a path to a volume file, or "auto":
    MNI152 when the normals are brains that register to it (:func:`mni152_fits`), else built from the normals."""
    k = str(kind)
    if k == "auto":
        spacing = auto_spacing(volumes)
        if mni152_fits(volumes, aligner, spacing=spacing):
            return mni152_reference(spacing)
        return build_reference(volumes, aligner, progress)
    if k == "normals":
        return build_reference(volumes, aligner, progress)
    if k == "mni152" or k.startswith("mni152:"):
        try:
            spacing = float(k.split(":", 1)[1]) if ":" in k else 2.0
            return mni152_reference(spacing)
        except ValueError as e:
            raise ValueError(f"alignment reference {k!r}: 'mni152:MM' needs a spacing between 0.5 and 8 mm "
                             f"({e})") from e
    p = Path(k)
    if not p.is_file():
        raise ValueError(f"alignment reference {k!r}: use 'normals', 'mni152' or an existing volume file")
    return reference_from_file(p)


def _name(v: Any, i: int) -> str:
    return str(getattr(v, "path", None) or f"volume {i}")


# ---------------------------------------------------------------------------------------------------------------
# similarity and the floor


def similarity(reference: np.ndarray, moved: np.ndarray, threshold: float = 0.1, trim: float = TRIM) -> float:
    """Trimmed Pearson correlation of two intensity-normalised images on one grid, over the union of their
    foregrounds (values above ``threshold``); 0 when either is empty or flat there.

    The ``trim`` share of voxels whose z-scores differ most is left out: a lesion is exactly where a scan differs
    from the reference, and a plain correlation would refuse the abnormal scans the product exists to find (a
    bright blob of 3% of an organ took a phantom from 0.95 to 0.70). A misregistration moves most of the anatomy,
    far more than ``trim``, so it still scores low."""
    region = (reference > threshold) | (moved > threshold)
    if region.sum() < 2:
        return 0.0
    a = reference[region].astype(np.float64)
    b = moved[region].astype(np.float64)
    sa, sb = a.std(), b.std()
    if not (sa > 0 and sb > 0):
        return 0.0
    if trim > 0:
        residual = np.abs((a - a.mean()) / sa - (b - b.mean()) / sb)
        keep = residual <= np.quantile(residual, 1.0 - trim)
        a, b = a[keep], b[keep]
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def calibrate_floor(similarities: Sequence[float], margin: float = FLOOR_MARGIN,
                    absolute: float = ABSOLUTE_FLOOR) -> float:
    """The similarity floor from the training normals' similarities: lowest minus ``margin``, at least
    ``absolute``."""
    s = np.asarray(list(similarities), dtype=np.float64)
    if s.size == 0:
        return float(absolute)
    return float(max(absolute, s.min() - margin))


# ---------------------------------------------------------------------------------------------------------------
# one alignment


@dataclass
class Alignment:
    """One volume aligned to the reference.

    ``array``: the input's intensities resampled onto the reference grid (``affine`` = the reference's);
    ``transform``: the SimpleITK transform (reference LPS points -> input LPS points); ``matrix_ras``: the same as a
    4x4 matrix on RAS points; ``similarity``, ``scales`` (singular values of the linear part), ``seconds``."""

    array: np.ndarray
    affine: np.ndarray
    transform: Any
    input_shape: tuple
    input_affine: np.ndarray
    similarity: float
    scales: tuple
    seconds: float
    reference_name: str = "reference"
    metric_floor: Optional[float] = None
    # the deformable stage (models aligned with "deformable"): the demons displacement-field transform applied before
    # the affine one (reference point -> deformed reference point -> input point), or None (affine only, or the stage
    # was left out for this volume: ``deformable`` says why, else it holds the similarity, the largest displacement
    # and the lowest Jacobian determinant in the brain)
    deformation: Any = None
    deformable: Optional[dict] = None
    _inverse: Any = field(default=None, repr=False, compare=False)

    @property
    def matrix_ras(self) -> np.ndarray:
        """The affine stage as a 4x4 matrix on RAS points (reference -> input)."""
        return _transform_matrix_ras(self.transform)

    def full_transform(self):
        """Reference LPS points -> input LPS points: the affine transform, after the deformation when there is one."""
        if self.deformation is None:
            return self.transform
        sitk = _sitk()
        return sitk.CompositeTransform([self.transform, self.deformation])  # the last one is applied first

    def inverse_transform(self):
        """Input LPS points -> reference LPS points (made once: a deformation's inverse is a displacement field,
        inverted iteratively on the reference grid)."""
        if self._inverse is None:
            sitk = _sitk()
            if self.deformation is None:
                self._inverse = self.transform.GetInverse()
            else:
                grid = to_sitk(np.zeros(self.array.shape, np.uint8), self.affine, "reference grid")
                fwd = sitk.TransformToDisplacementField(self.deformation, sitk.sitkVectorFloat64, grid.GetSize(),
                                                        grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
                inv = sitk.InvertDisplacementField(fwd, maximumNumberOfIterations=20, maxErrorToleranceThreshold=0.1,
                                                   meanErrorToleranceThreshold=0.001, enforceBoundaryCondition=True)
                inv_tx = sitk.DisplacementFieldTransform(sitk.Cast(inv, sitk.sitkVectorFloat64))
                self._inverse = sitk.CompositeTransform([inv_tx, self.transform.GetInverse()])
        return self._inverse

    def to_input(self, data: np.ndarray, interpolation: str = "linear", fill: float = 0.0) -> np.ndarray:
        """A map on the reference grid (RAS voxel order, the shape of ``array``) resampled onto the input's grid
        (its shape and voxel order). ``interpolation``: "linear" (heatmaps) or "nearest" (masks); input voxels
        outside the reference grid get ``fill``."""
        sitk = _sitk()
        d = np.asarray(data)
        is_bool = d.dtype == bool
        src = to_sitk(d.astype(np.float32), self.affine, "reference-grid map")
        grid = to_sitk(np.zeros(self.input_shape, np.uint8), self.input_affine, "input grid")
        interp = sitk.sitkNearestNeighbor if interpolation == "nearest" else sitk.sitkLinear
        out = sitk.Resample(src, grid, self.inverse_transform(), interp, float(fill), sitk.sitkFloat32)
        arr, _ = from_sitk(out)
        return arr > 0.5 if is_bool else arr.astype(np.float32, copy=False)

    def summary(self) -> dict:
        """Plain numbers for results and logs (JSON-ready). ``similarity`` is the affine stage's (the one the floor
        checks); a deformable model adds ``deformable``: the final similarity and largest displacement, or why the
        stage was left out for this volume."""
        out = {"method": "affine" if self.deformable is None else "deformable", "reference": self.reference_name,
               "similarity": round(self.similarity, 4),
               "metric_floor": None if self.metric_floor is None else round(self.metric_floor, 4),
               "scales": [round(float(s), 4) for s in self.scales], "seconds": round(self.seconds, 3),
               "matrix_ras": np.round(self.matrix_ras, 5).tolist()}
        if self.deformable is not None:
            out["deformable"] = dict(self.deformable)
        return out


@dataclass
class AffineAligner:
    """Affine registration to ``reference`` with failure checks (see the module docstring).

    ``metric_floor``: minimum similarity (calibrated with :func:`calibrate_floor`); ``scale_range``: allowed
    singular values of the linear part; ``sampling``: share of the reference's foreground voxels sampled by the
    metric; ``iterations``: per resolution level; ``seed``: sampling seed (results are deterministic);
    ``threads``: SimpleITK threads for the deformable stage (None: SimpleITK's global default; the affine stage runs
    on one thread, so that it is repeatable)."""

    reference: Reference
    metric_floor: float = ABSOLUTE_FLOOR
    scale_range: tuple = (0.6, 1.6)
    sampling: float = 0.1
    iterations: int = 100
    shrink: tuple = (4, 2, 1)
    smoothing: tuple = (2.0, 1.0, 0.0)
    bins: int = 32
    seed: int = 1
    threads: Optional[int] = None
    # coarse search of the starting rotation (rigid, before the affine stage): rotation_steps per side of 0 about
    # each axis, rotation_step_deg apart (2 x 15 deg: -30..30 deg, 125 starts at 1/4 resolution); (0, x): none
    rotation_steps: int = 2
    rotation_step_deg: float = 15.0
    # deformable stage after the affine one (``method`` "deformable"): diffeomorphic demons (SimpleITK) between
    # the reference and the affinely aligned volume (histogram-matched to it), on a grid shrunk by each
    # ``demons_shrink`` in turn with ``demons_iterations`` iterations each, the displacement field smoothed with a
    # Gaussian of ``demons_sigma`` (the regulariser: larger is stiffer). A deformation that folds (Jacobian
    # determinant below ``min_jacobian`` in the brain) or moves brain voxels more than ``max_displacement_mm`` is
    # not used: that volume keeps its affine alignment and the summary says why.
    deformable: bool = False
    demons_iterations: tuple = (30, 20)
    demons_shrink: tuple = (2, 1)
    demons_sigma: float = 2.0
    min_jacobian: float = 0.1
    max_displacement_mm: float = 30.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def method(self) -> str:
        return "deformable" if self.deformable else "affine"

    def with_reference(self, reference: Reference) -> "AffineAligner":
        return replace(self, reference=reference, _cache={})

    # -- the reference as SimpleITK images, made once
    def _fixed(self):
        if "fixed" not in self._cache:
            sitk = _sitk()
            ref = self.reference
            fixed = to_sitk(ref.array.astype(np.float32), ref.affine, "reference")
            mask = to_sitk(ref.foreground().astype(np.uint8), ref.affine, "reference mask")
            mask = sitk.BinaryDilate(mask, [3, 3, 3])
            self._cache["fixed"] = (fixed, mask)
        return self._cache["fixed"]

    def _register(self, moving):
        sitk = _sitk()
        fixed, mask = self._fixed()
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(self.bins))
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        # SimpleITK reads seed 0 as "seed from the wall clock": keep it positive so results are repeatable
        reg.SetMetricSamplingPercentage(float(self.sampling), max(1, int(self.seed)))
        reg.SetMetricFixedMask(mask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetInitialTransform(self._initial_transform(fixed, mask, moving), inPlace=False)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                     numberOfIterations=int(self.iterations),
                                                     relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(list(self.shrink))
        reg.SetSmoothingSigmasPerLevel(list(self.smoothing))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        with _repeatable_registration():
            out = reg.Execute(fixed, moving)
        # Execute returns a composite holding the optimised affine; flatten it to one AffineTransform
        if out.GetName() == "CompositeTransform":
            out = sitk.CompositeTransform(out)
            out.FlattenTransform()
            out = out.GetNthTransform(0) if out.GetNumberOfTransforms() == 1 else out
        return sitk.AffineTransform(out)

    def _initial_transform(self, fixed, mask, moving):
        """The affine stage's start: centres of mass matched (moments), then, when ``rotation_steps`` > 0, the best
        of a grid of rotations about the three axes by Mattes mutual information at 1/4 resolution (SimpleITK's
        exhaustive optimiser). A gradient descent started from the identity rotation stalls in a local optimum for
        heads turned by more than ~10 deg about two axes, as scanners place them."""
        sitk = _sitk()
        rigid = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
        if self.rotation_steps > 0:
            search = sitk.ImageRegistrationMethod()
            search.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(self.bins))
            search.SetMetricSamplingStrategy(search.NONE)
            search.SetMetricFixedMask(mask)
            search.SetInterpolator(sitk.sitkLinear)
            n = int(self.rotation_steps)
            search.SetOptimizerAsExhaustive(numberOfSteps=[n, n, n, 0, 0, 0],
                                            stepLength=float(np.deg2rad(self.rotation_step_deg)))
            search.SetOptimizerScales([1.0] * 6)
            search.SetShrinkFactorsPerLevel([max(self.shrink)])
            search.SetSmoothingSigmasPerLevel([max(self.smoothing)])
            search.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
            search.SetInitialTransform(rigid, inPlace=True)
            with _repeatable_registration():
                search.Execute(fixed, moving)  # leaves the best rotation of the grid in ``rigid``
        start = sitk.AffineTransform(3)
        start.SetCenter(rigid.GetCenter())
        start.SetMatrix(rigid.GetMatrix())
        start.SetTranslation(rigid.GetTranslation())
        return start

    def _deform(self, moved_norm):
        """The demons stage on the reference grid: ``moved_norm`` (the intensity-normalised input, resampled onto the
        reference grid by the affine stage) -> displacement field image (reference points -> points of the affinely
        aligned space, mm, float64 vectors)."""
        sitk = _sitk()
        fixed, _ = self._fixed()
        moving = sitk.HistogramMatching(moved_norm, fixed, numberOfHistogramLevels=64, numberOfMatchPoints=7,
                                        thresholdAtMeanIntensity=True)
        disp = None
        for iterations, shrink in zip(self.demons_iterations, self.demons_shrink):
            f, m = fixed, moving
            if shrink > 1:  # a coarse level: shrunk, smoothed against aliasing
                f = sitk.SmoothingRecursiveGaussian(sitk.Shrink(fixed, [int(shrink)] * 3), float(shrink - 1))
                m = sitk.SmoothingRecursiveGaussian(sitk.Shrink(moving, [int(shrink)] * 3), float(shrink - 1))
            demons = sitk.DiffeomorphicDemonsRegistrationFilter()
            if self.threads:
                demons.SetNumberOfThreads(int(self.threads))
            demons.SetNumberOfIterations(int(iterations))
            demons.SetSmoothDisplacementField(True)
            demons.SetStandardDeviations(float(self.demons_sigma))
            demons.SetUseImageSpacing(True)
            if disp is None:
                disp = demons.Execute(f, m)
            else:
                disp = demons.Execute(f, m, sitk.Resample(disp, f, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                          disp.GetPixelID()))
        if disp.GetSize() != fixed.GetSize():
            disp = sitk.Resample(disp, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, disp.GetPixelID())
        return sitk.Cast(disp, sitk.sitkVectorFloat64)

    def _deformation_check(self, disp) -> tuple[Optional[str], float, float]:
        """(why the displacement field is not used or None, largest displacement in the brain (mm), lowest Jacobian
        determinant there)."""
        sitk = _sitk()
        _, mask = self._fixed()
        inside = sitk.GetArrayFromImage(mask) > 0
        size = np.linalg.norm(sitk.GetArrayFromImage(disp), axis=-1)[inside]
        jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(disp))[inside]
        largest, lowest = float(size.max(initial=0.0)), float(jac.min(initial=1.0))
        if lowest < self.min_jacobian:
            return (f"it folds or collapses part of the brain (Jacobian determinant {lowest:.2f} < "
                    f"{self.min_jacobian:g})"), largest, lowest
        if largest > self.max_displacement_mm:
            return f"it moves brain voxels {largest:.1f} mm (> {self.max_displacement_mm:g})", largest, lowest
        return None, largest, lowest

    def align(self, array: np.ndarray, affine: Optional[np.ndarray] = None, name: str = "volume",
              check_floor: bool = True) -> Alignment:
        """Register ``array`` (input grid, voxel->RAS ``affine``) to the reference; raise AlignmentError when it
        cannot be aligned or the result fails a check. ``check_floor=False`` skips only the similarity floor
        (used while the floor is being calibrated; the absolute floor still applies)."""
        sitk = _sitk()
        t0 = time.perf_counter()
        arr = validate_array(array, name)
        if arr.shape[2] < 4:
            raise AlignmentError(f"{name}: {arr.shape[2]} slice(s); affine alignment needs a 3-D volume of at least "
                                 "4 slices (use a model trained with --align none for 2-D images)")
        norm, _ = _normalised(arr, name)
        moving = to_sitk(np.minimum(norm, 1.5), affine, name)
        try:
            transform = self._register(moving)
        except RuntimeError as e:  # ITK exceptions, e.g. too few samples in the overlap
            raise AlignmentError(f"{name}: registration to the {self.reference.name} reference failed "
                                 f"({str(e).strip().splitlines()[-1][:200]}); is it the same anatomy as the "
                                 "training scans?") from e
        fixed, _ = self._fixed()
        moved_norm = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        sim = similarity(self.reference.array, from_sitk(moved_norm)[0])
        lin = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
        scales = tuple(float(s) for s in np.linalg.svd(lin, compute_uv=False))
        result = Alignment(np.zeros(0, np.float32), self.reference.affine.copy(), transform,
                           tuple(arr.shape), np.eye(4) if affine is None else np.asarray(affine, np.float64),
                           sim, scales, 0.0, self.reference.name, self.metric_floor if check_floor else None)
        self._check(result, name, check_floor)  # the affine stage must hold before anything is built on it
        if self.deformable:
            result.deformable = self._deformable_stage(result, moved_norm, name)
        moved_raw = sitk.Resample(to_sitk(arr, affine, name), fixed, result.full_transform(), sitk.sitkLinear,
                                  float(arr.min()), sitk.sitkFloat32)
        result.array = from_sitk(moved_raw)[0].astype(np.float32, copy=False)
        result.seconds = time.perf_counter() - t0
        return result

    def _deformable_stage(self, result: Alignment, moved_norm, name: str) -> dict:
        """Fit the deformation on top of ``result``'s affine stage and keep it (``result.deformation``) when it passes
        its checks; returns the summary's ``deformable`` entry."""
        import logging

        sitk = _sitk()
        t = time.perf_counter()
        try:
            disp = self._deform(moved_norm)
        except RuntimeError as e:  # ITK exceptions: the affine alignment stands
            why = f"the registration failed ({str(e).strip().splitlines()[-1][:160]})"
            logging.getLogger(__name__).warning("%s: deformable stage left out: %s; aligned affinely", name, why)
            return {"used": False, "why": why, "seconds": round(time.perf_counter() - t, 3)}
        why, largest, lowest = self._deformation_check(disp)
        info = {"used": why is None, "max_displacement_mm": round(largest, 2), "min_jacobian": round(lowest, 3)}
        if why is not None:
            logging.getLogger(__name__).warning("%s: deformable stage left out: %s; aligned affinely", name, why)
            info["why"] = why
        else:
            fixed, _ = self._fixed()
            result.deformation = sitk.DisplacementFieldTransform(disp)  # takes the field over
            moved = sitk.Resample(moved_norm, fixed, result.deformation, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            info["similarity"] = round(similarity(self.reference.array, from_sitk(moved)[0]), 4)
        info["seconds"] = round(time.perf_counter() - t, 3)
        return info

    def _check(self, al: Alignment, name: str, check_floor: bool) -> None:
        lo, hi = self.scale_range
        what = f"{name}: alignment to the {self.reference.name} reference failed"
        hint = ("Is it the same anatomy and modality as the training scans, skull-stripped like them, and not "
                "cropped? Check the file, or use a model trained with --align none.")
        if np.linalg.det(np.asarray(al.transform.GetMatrix()).reshape(3, 3)) <= 0:
            raise AlignmentError(f"{what}: the transform mirrors the volume. {hint}")
        if min(al.scales) < lo or max(al.scales) > hi:
            raise AlignmentError(f"{what}: absurd scale {', '.join(f'{s:.2f}' for s in al.scales)} (allowed "
                                 f"{lo:g}-{hi:g}). {hint}")
        floor = self.metric_floor if check_floor else ABSOLUTE_FLOOR
        if not al.similarity >= floor:
            raise AlignmentError(f"{what}: similarity {al.similarity:.3f} below the floor {floor:.3f} "
                                 f"({'calibrated on the training normals' if check_floor else 'absolute'}). {hint}")

    # -- model files
    def to_payload(self) -> tuple[dict, Any]:
        """(plain settings + reference metadata, reference tensor) for a checkpoint."""
        ref_meta, tensor = self.reference.to_payload()
        meta = {"method": "affine", "reference": ref_meta, "metric": f"correlation trimmed {TRIM:g}",
                "metric_floor": float(self.metric_floor),
                "scale_range": [float(s) for s in self.scale_range], "sampling": float(self.sampling),
                "iterations": int(self.iterations), "shrink": [int(s) for s in self.shrink],
                "smoothing": [float(s) for s in self.smoothing], "bins": int(self.bins), "seed": int(self.seed),
                "rotation_steps": int(self.rotation_steps), "rotation_step_deg": float(self.rotation_step_deg)}
        if self.deformable:  # "deformable": a file older code must refuse (it would align without the deformation)
            meta.update(method="deformable", demons_iterations=[int(x) for x in self.demons_iterations],
                        demons_shrink=[int(x) for x in self.demons_shrink], demons_sigma=float(self.demons_sigma),
                        min_jacobian=float(self.min_jacobian), max_displacement_mm=float(self.max_displacement_mm))
        return meta, tensor

    @classmethod
    def from_payload(cls, meta: dict, tensor: Any) -> "AffineAligner":
        method = meta.get("method", "affine")
        if method not in ("affine", "deformable"):
            raise ValueError(f"alignment method {method!r} is not supported by this spmamba")
        deformable = {}
        if method == "deformable":
            deformable = dict(deformable=True, demons_iterations=tuple(int(x) for x in meta["demons_iterations"]),
                              demons_shrink=tuple(int(x) for x in meta["demons_shrink"]),
                              demons_sigma=float(meta["demons_sigma"]), min_jacobian=float(meta["min_jacobian"]),
                              max_displacement_mm=float(meta["max_displacement_mm"]))
        return cls(Reference.from_payload(meta["reference"], tensor), float(meta["metric_floor"]),
                   tuple(meta.get("scale_range", (0.6, 1.6))), float(meta.get("sampling", 0.1)),
                   int(meta.get("iterations", 100)), tuple(meta.get("shrink", (4, 2, 1))),
                   tuple(meta.get("smoothing", (2.0, 1.0, 0.0))), int(meta.get("bins", 32)), int(meta.get("seed", 1)),
                   # model files written before the rotation search aligned without it
                   rotation_steps=int(meta.get("rotation_steps", 0)),
                   rotation_step_deg=float(meta.get("rotation_step_deg", 15.0)), **deformable)
