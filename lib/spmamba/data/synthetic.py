"""Brain-MRI phantoms with simulated lesions, made from the MNI152 2009a template that nilearn's wheel ships.

No download: nilearn installs ``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` (1 mm, 197x233x189)
under ``nilearn/datasets/data``. From these we build, once per spacing, a skull-stripped T1 template with tissue
probability maps (GM, WM and CSF = brain mask minus GM and WM).

A subject is the template seen through a random head pose and anatomy (affine + smooth non-linear warp), with a
random T1 contrast (piecewise-linear remapping of the CSF / GM / WM intensities), a smooth multiplicative bias field
(``monai.transforms.RandBiasField``), Rician noise (``monai.transforms.RandRicianNoise``) and a random global gain.
All subjects share one output grid (RAS, ``spacing`` mm, cropped to the template's brain bounding box plus a margin),
so a training folder never mixes shapes. Background is exactly 0 (skull-stripped, as in BraTS-style data).

``pose="scanner"`` (``make_dataset(unregistered=True)``, ``spmamba synth --unregistered``) instead places the head as a
scanner would (``SCANNER_POSE``: rotation up to 15 degrees about each axis, shift 15 mm, scale 0.9-1.1 per axis, a
2-5 mm warp) and writes each subject on its own grid: its own affine and voxel order (``ORIENTATIONS``) and a field
of view of the head plus a random margin per side, so shapes differ; the pose is in ``params["pose"]``.

Abnormal subjects carry one lesion family (``LESION_FAMILIES``):

- ``tumour``: irregular mass with an enhancing rim, an optional dark necrotic core and a hypointense oedema halo,
  pushing the surrounding anatomy outwards (mass effect); the mask is the whole lesion (core + rim + oedema).
- ``ms``: 3-10 small hyperintense foci (2-5 mm radius) in white matter.
- ``infarct``: a hypointense (CSF-like) region in a cortical grey/white-matter territory.
- ``haemorrhage``: a compact hyperintense blob with a thin dark (haemosiderin) rim.

Every random choice comes from a generator seeded by ``(seed, role, index)``, so a subject is identical whatever
``n_train`` / ``n_test`` is, and a dataset is identical for a given seed on any machine.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from spmamba.atomic import atomic_path

__all__ = [
    "LESION_FAMILIES",
    "Template",
    "SyntheticSubject",
    "POSES",
    "SCANNER_POSE",
    "ORIENTATIONS",
    "load_template",
    "make_subject",
    "make_normal",
    "make_abnormal",
    "make_dataset",
    "template_files",
]

LESION_FAMILIES: tuple[str, ...] = ("tumour", "ms", "infarct", "haemorrhage")
_ROLES = {"train": 1, "test": 2, "demo": 3, "custom": 4}
_MARGIN_MM = 14.0


# ----------------------------------------------------------------------------------------------------------------
# Template
# ----------------------------------------------------------------------------------------------------------------
def template_files() -> dict[str, Path]:
    """Paths of the MNI152 2009a T1 / GM / WM files inside the installed nilearn wheel."""
    try:
        import nilearn
    except ImportError as exc:  # pragma: no cover - nilearn is a pinned dependency
        raise RuntimeError("spmamba synth needs nilearn (pip install 'spmamba[data]'): it ships the MNI template") from exc
    base = Path(nilearn.__file__).parent / "datasets" / "data"
    files = {k: base / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise RuntimeError(f"nilearn is installed but its MNI152 template files are missing: {', '.join(missing)}")
    return files


@dataclass(frozen=True)
class Template:
    """Pre-filtered 1 mm template maps and the output grid for one spacing.

    ``maps``: float32 array (4, X, Y, Z) = T1 (0..1, skull-stripped), GM, WM, CSF probabilities, on the 1 mm grid.
    ``src_affine``: voxel -> MNI mm of the 1 mm maps. ``shape`` / ``affine``: the output grid (RAS, ``spacing`` mm).
    ``tissue_t1``: mean template T1 of CSF, GM, WM (knots of the contrast remapping).
    """

    maps: np.ndarray
    src_affine: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: float
    tissue_t1: tuple[float, float, float]


@lru_cache(maxsize=4)
def load_template(spacing: float = 2.0) -> Template:
    """Build (once per spacing and process, ~2 s) the skull-stripped template and the output grid."""
    if not (0.5 <= spacing <= 8.0):
        raise ValueError(f"spacing must be between 0.5 and 8 mm, got {spacing}")
    files = template_files()
    imgs = {k: nib.load(str(p)) for k, p in files.items()}
    src_affine = imgs["t1"].affine.astype(np.float64)
    t1 = np.asarray(imgs["t1"].dataobj, dtype=np.float32) / 255.0
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0

    tissue = gm + wm
    brain = ndimage.binary_closing(tissue > 0.2, structure=ndimage.generate_binary_structure(3, 1), iterations=3)
    brain = ndimage.binary_fill_holes(brain)
    brain = ndimage.binary_opening(brain, iterations=1)
    soft = ndimage.gaussian_filter(brain.astype(np.float32), 0.7)
    csf = np.clip(soft - tissue, 0.0, 1.0)
    t1 = t1 * soft

    # Mean T1 per tissue (where that tissue dominates), the knots of the per-subject contrast curve.
    knots = []
    for prob in (csf, gm, wm):
        sel = (prob > 0.7) & brain
        knots.append(float(np.median(t1[sel])) if sel.any() else 0.0)
    tissue_t1 = (knots[0], knots[1], knots[2])

    # Anti-alias before sampling on a coarser grid.
    sigma = max(0.0, 0.42 * (spacing - 1.0))
    maps = np.stack([t1, gm, wm, csf]).astype(np.float32)
    if sigma > 0:
        for c in range(maps.shape[0]):
            maps[c] = ndimage.gaussian_filter(maps[c], sigma)

    # Output grid: brain bounding box (in MNI mm) + margin, at `spacing`.
    idx = np.argwhere(brain)
    lo_vox, hi_vox = idx.min(0), idx.max(0)
    lo = src_affine[:3, :3] @ lo_vox + src_affine[:3, 3] - _MARGIN_MM
    hi = src_affine[:3, :3] @ hi_vox + src_affine[:3, 3] + _MARGIN_MM
    shape = tuple(int(np.ceil((h - l) / spacing)) + 1 for l, h in zip(lo, hi))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    return Template(maps=maps, src_affine=src_affine, shape=shape, affine=affine, spacing=float(spacing),
                    tissue_t1=tissue_t1)


# ----------------------------------------------------------------------------------------------------------------
# Subjects
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticSubject:
    """One phantom: ``image`` float32 (X, Y, Z), ``mask`` uint8 0/1 (same grid), ``affine`` (4, 4) voxel -> RAS mm."""

    id: str
    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    abnormal: bool
    family: str = "none"
    params: dict = field(default_factory=dict)

    @property
    def lesion_voxels(self) -> int:
        return int(self.mask.sum())


def _rng(seed: int, role: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _ROLES.get(role, 4), int(index)]))


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    return _rotation_deg(rng.uniform(-max_deg, max_deg, size=3))


def _rotation_deg(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    a, b, c = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cell_vox: float) -> np.ndarray:
    """Smooth random field (zero mean, unit-ish std) with correlation length about ``cell_vox`` voxels."""
    coarse = tuple(max(2, int(np.ceil(s / max(cell_vox, 1.0))) + 1) for s in shape)
    low = rng.standard_normal(coarse).astype(np.float32)
    zoom = [s / c for s, c in zip(shape, coarse)]
    out = ndimage.zoom(low, zoom, order=3, mode="nearest", grid_mode=True)
    out = out[tuple(slice(0, s) for s in shape)]
    if out.shape != tuple(shape):  # zoom rounding: pad by edge values
        pad = [(0, s - o) for s, o in zip(shape, out.shape)]
        out = np.pad(out, pad, mode="edge")
    return out


def _upsample_matrix(coarse: int, size: int) -> np.ndarray:
    """(coarse, size) weights of the cubic upsampling ``_smooth_field`` applies along one axis."""
    eye = np.eye(coarse, dtype=np.float32)
    rows = [ndimage.zoom(e, size / coarse, order=3, mode="nearest", grid_mode=True)[:size] for e in eye]
    return np.stack([np.pad(r, (0, size - len(r)), mode="edge") for r in rows])


def _smooth_field_separable(rng: np.random.Generator, shape: Sequence[int], cell_vox: float) -> np.ndarray:
    """:func:`_smooth_field` (same draws; equal to float32 precision) as three small matrix products: the 3-D cubic
    zoom costs ~1 s per field on a 2-3 M voxel grid, this ~0.05 s."""
    coarse = tuple(max(2, int(np.ceil(s / max(cell_vox, 1.0))) + 1) for s in shape)
    out = rng.standard_normal(coarse).astype(np.float32)
    for axis, (c, s) in enumerate(zip(coarse, shape)):
        out = np.moveaxis(np.tensordot(out, _upsample_matrix(c, s), axes=([axis], [0])), -1, axis)
    return np.ascontiguousarray(out)


@dataclass
class _Lesion:
    """A lesion in subject (output-grid) space: centre in mm, radius in mm, mass-effect strength."""

    family: str
    centre_mm: np.ndarray
    radius_mm: float
    push: float = 0.0


def _grid_mm(tpl: Template) -> np.ndarray:
    ii = np.indices(tpl.shape, dtype=np.float32).reshape(3, -1)
    return (tpl.affine[:3, :3] @ ii + tpl.affine[:3, 3:4]).astype(np.float32)


@lru_cache(maxsize=4)
def _cached_grid(spacing: float) -> np.ndarray:
    return _grid_mm(load_template(spacing))


def _warp_coordinates(tpl: Template, rng: np.random.Generator, lesions: Sequence[_Lesion],
                      strength: float = 1.0) -> np.ndarray:
    """Template voxel coordinates (3, X*Y*Z) sampled by each output voxel: affine + smooth warp + mass effect."""
    pts = _cached_grid(tpl.spacing)
    centre = pts.mean(axis=1, keepdims=True)
    rot = _rotation(rng, 4.0 * strength)
    scale = np.diag(rng.uniform(1 - 0.05 * strength, 1 + 0.05 * strength, size=3))
    shift = rng.uniform(-3.0, 3.0, size=(3, 1)) * strength
    m = (rot @ scale).astype(np.float32)
    q = m @ (pts - centre) + centre + shift.astype(np.float32)

    # Smooth non-linear warp: random displacements on a ~24 mm lattice, cubic-upsampled (mm).
    amp = rng.uniform(1.0, 3.0) * strength
    cell = 24.0 / tpl.spacing
    for d in range(3):
        q[d] += amp * _smooth_field(rng, tpl.shape, cell).reshape(-1)

    # Mass effect: sample closer to the lesion centre, so tissue looks pushed outwards.
    for les in lesions:
        if les.push <= 0:
            continue
        diff = pts - les.centre_mm.reshape(3, 1).astype(np.float32)
        r2 = (diff ** 2).sum(0)
        w = les.push * np.exp(-r2 / (2.0 * (1.6 * les.radius_mm) ** 2))
        q -= w * diff

    inv = np.linalg.inv(tpl.src_affine)
    return (inv[:3, :3].astype(np.float32) @ q + inv[:3, 3:4].astype(np.float32))


def _sample(tpl: Template, coords: np.ndarray, shape: Sequence[int] | None = None) -> np.ndarray:
    """Sample the 4 template maps at template voxel coordinates -> (4, X, Y, Z) float32 (``shape``: the output grid's,
    default the template output grid's)."""
    shape = tuple(tpl.shape if shape is None else shape)
    out = np.empty((tpl.maps.shape[0],) + shape, dtype=np.float32)
    for c in range(tpl.maps.shape[0]):
        out[c] = ndimage.map_coordinates(tpl.maps[c], coords, order=1, mode="constant", cval=0.0,
                                         prefilter=False).reshape(shape)
    return out


@lru_cache(maxsize=4)
def _brain_depth(spacing: float) -> np.ndarray:
    """Distance (voxels) to the outside of the unwarped template brain on the output grid."""
    base = _base_maps(spacing)
    return ndimage.distance_transform_edt((base[1] + base[2] + base[3]) > 0.5).astype(np.float32)


def _pick_centre(rng: np.random.Generator, prob: np.ndarray, depth: np.ndarray, affine: np.ndarray,
                 min_depth_vox: float, thresh: float) -> np.ndarray:
    """A random voxel (returned in mm) where ``prob > thresh`` and at least ``min_depth_vox`` inside the brain."""
    ok = (prob > thresh) & (depth >= min_depth_vox)
    if not ok.any():
        ok = (prob > thresh * 0.5) & (depth >= max(1.0, min_depth_vox / 2))
    if not ok.any():
        ok = depth >= depth.max() * 0.5
    cand = np.argwhere(ok)
    v = cand[rng.integers(len(cand))].astype(np.float64)
    v += rng.uniform(-0.5, 0.5, size=3)
    return affine[:3, :3] @ v + affine[:3, 3]


def _plan_lesions(family: str, tpl: Template, rng: np.random.Generator) -> list[_Lesion]:
    """Choose lesion centres on the *unwarped* template resampled to the output grid (the warp is small)."""
    base = _base_maps(tpl.spacing)
    gm, wm = base[1], base[2]
    brain = _brain_depth(tpl.spacing)
    sp = tpl.spacing
    if family == "tumour":
        r = rng.uniform(9.0, 18.0)
        c = _pick_centre(rng, wm, brain, tpl.affine, (r * 0.9) / sp, 0.5)
        return [_Lesion("tumour", c, r, push=rng.uniform(0.25, 0.5))]
    if family == "ms":
        n = int(rng.integers(3, 11))
        out = []
        for _ in range(n):
            r = rng.uniform(max(2.0, 0.9 * sp), max(5.0, 1.3 * sp))
            out.append(_Lesion("ms", _pick_centre(rng, wm, brain, tpl.affine, 3.0 / sp + 1, 0.75), r))
        return out
    if family == "infarct":
        r = rng.uniform(10.0, 20.0)
        return [_Lesion("infarct", _pick_centre(rng, gm, brain, tpl.affine, 4.0 / sp + 1, 0.5), r)]
    if family == "haemorrhage":
        r = rng.uniform(5.0, 12.0)
        return [_Lesion("haemorrhage", _pick_centre(rng, wm + gm, brain, tpl.affine, r / sp, 0.6), r)]
    raise ValueError(f"unknown lesion family {family!r}; choose from {', '.join(LESION_FAMILIES)}")


@lru_cache(maxsize=4)
def _base_maps(spacing: float) -> np.ndarray:
    tpl = load_template(spacing)
    inv = np.linalg.inv(tpl.src_affine)
    pts = _cached_grid(spacing)
    coords = inv[:3, :3].astype(np.float32) @ pts + inv[:3, 3:4].astype(np.float32)
    return _sample(tpl, coords)


# ----------------------------------------------------------------------------------------------------------------
# Scanner pose (pose="scanner"): unregistered subjects on their own grids
# ----------------------------------------------------------------------------------------------------------------
POSES: tuple[str, ...] = ("registered", "scanner")
#: ranges of the scanner pose: rotation about each axis, shift of the head, per-axis scale, amplitude and lattice of
#: the non-linear warp, field-of-view margin around the head on each of the 6 sides
SCANNER_POSE = {"max_rotation_deg": 15.0, "max_shift_mm": 15.0, "scale": (0.9, 1.1), "warp_mm": (2.0, 5.0),
                "warp_cell_mm": 28.0, "margin_mm": (4.0, 20.0)}
#: voxel orders a scanner / converter may write (axis directions of the voxel grid)
ORIENTATIONS = {"RAS": (1.0, 1.0, 1.0), "LAS": (-1.0, 1.0, 1.0), "LPS": (-1.0, -1.0, 1.0)}


@dataclass(frozen=True)
class _Grid:
    """An output grid other than the template's (same attribute names as :class:`Template` for painting)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: float


@lru_cache(maxsize=4)
def _brain_points(spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Template-frame mm of the unwarped template's brain voxels (3, N) on the output grid, and their centroid."""
    base = _base_maps(spacing)
    pts = _cached_grid(spacing)[:, ((base[1] + base[2] + base[3]) > 0.02).reshape(-1)]
    return pts, pts.mean(axis=1).astype(np.float64)


@lru_cache(maxsize=4)
def _brain_probability(spacing: float) -> np.ndarray:
    tpl = load_template(spacing)
    return np.clip(tpl.maps[1] + tpl.maps[2] + tpl.maps[3], 0.0, 1.0)


def _scanner_coordinates(tpl: Template, rng: np.random.Generator, lesions: Sequence[_Lesion]
                         ) -> tuple[_Grid, np.ndarray, list[_Lesion], dict]:
    """Pose, warp and field of view of a scanner-placed subject.

    The head (template frame, MNI mm) is placed in scanner mm by ``x -> R S (x - c) + c + t`` (c: brain centroid);
    a smooth warp (``warp_mm`` amplitude on a ``warp_cell_mm`` lattice) and the tumours' mass effect act in the
    template frame. The subject's grid has ``tpl.spacing`` mm voxels in one of ``ORIENTATIONS`` and covers the
    warped head plus a random margin on each side (so its shape varies). Returns the grid, the template voxel
    coordinates sampled by each of its voxels (3, N), the lesions moved to scanner mm (centred on the voxel that
    samples the planned centre) and the pose parameters (JSON-ready).
    """
    P = SCANNER_POSE
    sp = float(tpl.spacing)
    angles = rng.uniform(-P["max_rotation_deg"], P["max_rotation_deg"], size=3)
    scale = rng.uniform(P["scale"][0], P["scale"][1], size=3)
    shift = rng.uniform(-P["max_shift_mm"], P["max_shift_mm"], size=3)
    amp = float(rng.uniform(*P["warp_mm"]))
    orientation = list(ORIENTATIONS)[int(rng.integers(len(ORIENTATIONS)))]
    margins = rng.uniform(P["margin_mm"][0], P["margin_mm"][1], size=(2, 3))  # low / high index side per axis

    brain_pts, centre = _brain_points(sp)
    lin = _rotation_deg(angles) @ np.diag(scale)
    pose = np.eye(4)  # template mm -> scanner mm
    pose[:3, :3] = lin
    pose[:3, 3] = centre + shift - lin @ centre
    inv_pose = np.linalg.inv(pose)

    # A generous grid around the posed head (room for the warp and the largest margin), in the chosen voxel order.
    world = lin @ brain_pts.astype(np.float64) + pose[:3, 3:4]
    reserve = P["margin_mm"][1] + 4.0 * amp + 4.0 * sp
    lo, hi = world.min(axis=1) - reserve, world.max(axis=1) + reserve
    signs = np.asarray(ORIENTATIONS[orientation])
    big_shape = tuple(int(np.ceil((h - l) / sp)) + 1 for l, h in zip(lo, hi))
    big = np.diag(np.append(signs * sp, 1.0))
    big[:3, 3] = np.where(signs > 0, lo, hi)

    ii = np.indices(big_shape, dtype=np.float32).reshape(3, -1)
    w_mm = big[:3, :3].astype(np.float32) @ ii + big[:3, 3:4].astype(np.float32)
    a = inv_pose[:3, :3].astype(np.float32) @ w_mm + inv_pose[:3, 3:4].astype(np.float32)  # template frame
    q = a.copy()
    cell = P["warp_cell_mm"] / sp
    for d in range(3):
        q[d] += amp * _smooth_field_separable(rng, big_shape, cell).reshape(-1)

    # Each lesion goes where its planned centre is sampled; the mass effect pushes tissue away from that point.
    moved = []
    for les in lesions:
        k = int(np.argmin(((q - les.centre_mm.reshape(3, 1).astype(np.float32)) ** 2).sum(0)))
        a_c = a[:, k].copy()
        moved.append(_Lesion(les.family, w_mm[:, k].astype(np.float64), les.radius_mm, les.push))
        if les.push > 0:
            diff = a - a_c.reshape(3, 1)
            wgt = les.push * np.exp(-(diff ** 2).sum(0) / (2.0 * (1.6 * les.radius_mm) ** 2))
            q -= wgt * diff
    inv = np.linalg.inv(tpl.src_affine)
    coords = inv[:3, :3].astype(np.float32) @ q + inv[:3, 3:4].astype(np.float32)

    # Field of view: the head's bounding box on the generous grid plus the random margins, clipped to it.
    # (head extent from every other voxel, widened by one voxel: the full grid costs 8x more to sample)
    sub = np.zeros(big_shape, dtype=bool)
    sub[::2, ::2, ::2] = True
    sub_shape = tuple((n + 1) // 2 for n in big_shape)
    brain = ndimage.map_coordinates(_brain_probability(sp), coords[:, sub.reshape(-1)], order=1, mode="constant",
                                    cval=0.0, prefilter=False).reshape(sub_shape)
    idx = np.argwhere(brain > 0.02) * 2
    idx = np.concatenate([idx - 1, idx + 1])
    m_vox = np.round(margins / sp).astype(int)
    start = np.maximum(idx.min(axis=0) - m_vox[0], 0)
    stop = np.minimum(idx.max(axis=0) + 1 + m_vox[1], np.asarray(big_shape))
    shape = tuple(int(b - a_) for a_, b in zip(start, stop))
    affine = big.copy()
    affine[:3, 3] = big[:3, :3] @ start + big[:3, 3]
    keep = np.zeros(big_shape, dtype=bool)
    keep[tuple(slice(int(a_), int(b)) for a_, b in zip(start, stop))] = True
    coords = coords[:, keep.reshape(-1)]  # C order: the crop's voxels in the crop's own C order
    params = {"kind": "scanner", "rotation_deg": [round(float(x), 3) for x in angles],
              "scale": [round(float(x), 4) for x in scale], "shift_mm": [round(float(x), 3) for x in shift],
              "warp_mm": round(amp, 3), "orientation": orientation, "shape": list(shape),
              "margins_mm": [[round(float(x), 2) for x in (idx.min(axis=0) - start) * sp],
                             [round(float(x), 2) for x in (stop - 1 - idx.max(axis=0)) * sp]],
              "template_to_scanner": np.round(pose, 6).tolist()}
    return _Grid(shape=shape, affine=affine, spacing=sp), coords, moved, params


def _local_box(centre_vox: np.ndarray, reach_vox: float, shape: Sequence[int]) -> tuple[slice, ...]:
    lo = np.maximum(np.floor(centre_vox - reach_vox).astype(int), 0)
    hi = np.minimum(np.ceil(centre_vox + reach_vox).astype(int) + 1, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _paint_lesion(img: np.ndarray, mask: np.ndarray, tissue: np.ndarray, les: _Lesion, tpl: "Template | _Grid",
                  rng: np.random.Generator, levels: dict[str, float]) -> int:
    """Change intensities of ``img`` and set ``mask`` for one lesion, in place (local box only).

    The mask is the lesion's support (soft membership >= 0.5) inside the brain, whatever tissue it covers. A lesion that would leave no mask
    voxel (too small for the grid, or outside the parenchyma) is not painted; returns the mask voxel count.
    """
    sp = tpl.spacing
    inv = np.linalg.inv(tpl.affine)
    cv = inv[:3, :3] @ les.centre_mm + inv[:3, 3]
    reach = 1.6 * les.radius_mm / sp + 2
    box = _local_box(cv, reach, tpl.shape)
    ii = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")).astype(np.float32)
    diff = (ii - cv.reshape(3, 1, 1, 1).astype(np.float32)) * sp
    # Random ellipsoid: per-axis stretch + random rotation.
    rot = _rotation(rng, 90.0).astype(np.float32)
    stretch = rng.uniform(0.75, 1.3, size=3).astype(np.float32)
    d = np.einsum("ij,j...->i...", rot, diff) / stretch.reshape(3, 1, 1, 1)
    r = np.sqrt((d ** 2).sum(0)) / les.radius_mm  # 1 at the nominal boundary
    # Irregular boundary: modulate the radius with a smooth field (lobulated shape).
    irregular = {"tumour": 0.25, "ms": 0.15, "infarct": 0.35, "haemorrhage": 0.12}[les.family]
    noise = _smooth_field(rng, r.shape, max(2.0, les.radius_mm / sp / 1.5))
    r = r / np.clip(1.0 + irregular * noise, 0.5, 1.6)
    edge = 0.6 / max(les.radius_mm / sp, 1.0)  # soft edge about 0.6 voxel wide

    local = img[box]
    t_local = tissue[:, box[0], box[1], box[2]]
    brain_w = np.clip(t_local[1] + t_local[2] + t_local[3], 0, 1)
    parenchyma = np.clip(t_local[1] + t_local[2], 0, 1)
    texture = 1.0 + 0.06 * _smooth_field(rng, r.shape, 1.5)

    def soft(rad: float) -> np.ndarray:
        return np.clip((rad - r) / edge + 0.5, 0.0, 1.0)

    wm_level, csf_level = levels["wm"], levels["csf"]
    if les.family == "tumour":
        oedema_r = rng.uniform(1.25, 1.6)
        a_oed = soft(oedema_r) * brain_w
        a_core = soft(1.0) * brain_w
        a_nec = soft(rng.uniform(0.35, 0.6)) * brain_w if rng.random() < 0.75 else np.zeros_like(r)
        oed = local * rng.uniform(0.72, 0.85)
        local = local * (1 - a_oed) + oed * a_oed
        rim_level = wm_level * rng.uniform(1.25, 1.6)
        local = local * (1 - a_core) + rim_level * texture * a_core
        local = local * (1 - a_nec) + csf_level * rng.uniform(0.9, 1.4) * texture * a_nec
        support = soft(oedema_r)
    elif les.family == "ms":
        a = soft(1.0) * parenchyma
        local = local * (1 - a) + wm_level * rng.uniform(1.3, 1.6) * texture * a
        support = soft(1.0)
    elif les.family == "infarct":
        a = soft(1.0) * parenchyma
        level = csf_level * rng.uniform(1.0, 1.6)
        local = local * (1 - a) + np.minimum(local, level * texture) * a  # darkens tissue, never brightens
        support = soft(1.0)
    elif les.family == "haemorrhage":
        a_all = soft(1.0) * brain_w
        a_core = soft(rng.uniform(0.7, 0.85)) * brain_w
        local = local * (1 - a_all) + csf_level * rng.uniform(0.6, 0.9) * a_all  # dark rim
        local = local * (1 - a_core) + wm_level * rng.uniform(1.4, 1.8) * texture * a_core
        support = soft(1.0)
    else:  # pragma: no cover - guarded by _plan_lesions
        raise ValueError(les.family)
    les_mask = (support >= 0.5) & (brain_w > 0.5)
    if not les_mask.any():
        return 0
    img[box] = local
    mask[box] |= les_mask
    return int(les_mask.sum())


def sid_or(subject_id: str | None, role: str, index: int) -> str:
    return subject_id or f"{role}-{index:04d}"


def make_subject(seed: int, index: int = 0, *, abnormal: bool = False, family: str | None = None,
                 spacing: float = 2.0, role: str = "custom", subject_id: str | None = None,
                 pose: str = "registered") -> SyntheticSubject:
    """Generate one phantom in memory (deterministic in ``seed, role, index``; ~0.3-1 s at 2 mm).

    ``family`` (abnormal only): one of ``LESION_FAMILIES``; None picks one at random.
    ``pose``: "registered" (default): the template's output grid, small pose change (4 degrees, 3 mm, 5 %);
    "scanner": the head as a scanner places it (``SCANNER_POSE``: rotation up to 15 degrees about each axis,
    shift up to 15 mm, scale 0.9-1.1 per axis, a 2-5 mm warp), on its own grid (own affine and voxel order, field of
    view = the head plus 4-20 mm per side, so the shape varies); ``params["pose"]`` records it.
    Returns a :class:`SyntheticSubject` with ``image`` float32 (X, Y, Z), ``mask`` uint8 (all 0 when normal).
    """
    if family is not None and family not in LESION_FAMILIES:
        raise ValueError(f"unknown lesion family {family!r}; choose from {', '.join(LESION_FAMILIES)}")
    if pose not in POSES:
        raise ValueError(f"unknown pose {pose!r}; choose from {', '.join(POSES)}")
    tpl = load_template(float(spacing))
    rng = _rng(seed, role, index)
    # Draw the lesion plan from its own stream so normal anatomy does not depend on the lesion.
    les_rng = np.random.default_rng(rng.integers(2 ** 63))
    anat_rng = np.random.default_rng(rng.integers(2 ** 63))
    noise_seed = int(rng.integers(2 ** 31 - 1))
    if abnormal:
        family = family or LESION_FAMILIES[int(les_rng.integers(len(LESION_FAMILIES)))]
        lesions = _plan_lesions(family, tpl, les_rng)
    else:
        family, lesions = "none", []

    pose_params = None
    if pose == "scanner":
        pose_rng = np.random.default_rng(rng.integers(2 ** 63))
        grid, coords, lesions, pose_params = _scanner_coordinates(tpl, pose_rng, lesions)
        maps = _sample(tpl, coords, grid.shape)
    else:
        grid = tpl
        coords = _warp_coordinates(tpl, anat_rng, lesions)
        maps = _sample(tpl, coords)  # (4, X, Y, Z): T1, GM, WM, CSF
    t1 = maps[0]
    brain = np.clip(maps[1] + maps[2] + maps[3], 0.0, 1.0)

    # Contrast: map the template's CSF / GM / WM intensities to jittered subject values (monotone curve).
    k_csf, k_gm, k_wm = load_template(float(spacing)).tissue_t1
    wm_v = 1.0
    gm_v = anat_rng.uniform(0.58, 0.72)
    csf_v = anat_rng.uniform(0.12, 0.3)
    xs = [0.0, k_csf, k_gm, k_wm, max(1.0, k_wm * 1.3)]
    ys = [0.0, csf_v, gm_v, wm_v, wm_v * anat_rng.uniform(1.1, 1.3)]
    img = np.interp(t1 / np.maximum(brain, 1e-3) * (brain > 1e-3), xs, ys).astype(np.float32) * brain

    mask = np.zeros(grid.shape, dtype=bool)
    levels = {"wm": wm_v, "gm": gm_v, "csf": csf_v}
    painted = [les for les in lesions if _paint_lesion(img, mask, maps, les, grid, les_rng, levels) > 0]

    # Bias field and Rician noise (MONAI), then skull-strip again and apply a random scanner gain.
    from monai.transforms import RandBiasField, RandRicianNoise

    bias = RandBiasField(degree=3, coeff_range=(0.0, anat_rng.uniform(0.05, 0.25)), prob=1.0)
    bias.set_random_state(seed=noise_seed)
    img = np.asarray(bias(img[None]))[0]
    noise = RandRicianNoise(prob=1.0, std=anat_rng.uniform(0.01, 0.035), relative=False, sample_std=False)
    noise.set_random_state(seed=(noise_seed + 1) % (2 ** 31 - 1))
    img = np.asarray(noise(img[None]))[0]
    gain = anat_rng.uniform(400.0, 1200.0)
    img = (img * (brain > 0.05) * gain).astype(np.float32)

    sid = sid_or(subject_id, role, index)
    if abnormal and not painted:  # every planned lesion fell outside the parenchyma: try another draw
        return make_subject(seed, index + 100_003, abnormal=True, family=family, spacing=spacing, role=role,
                            subject_id=sid_or(subject_id, role, index), pose=pose)
    params = {"family": family, "n_lesions": len(painted),
              "lesion_radius_mm": [round(float(l.radius_mm), 2) for l in painted],
              "contrast": {"csf": round(csf_v, 3), "gm": round(gm_v, 3)}, "gain": round(gain, 1)}
    if pose_params is not None:
        params["pose"] = pose_params
    return SyntheticSubject(id=sid, image=img, mask=mask.astype(np.uint8), affine=grid.affine.copy(),
                            abnormal=bool(abnormal), family=family, params=params)


def make_normal(seed: int, index: int = 0, spacing: float = 2.0, role: str = "custom") -> SyntheticSubject:
    """A normal phantom (no lesion, empty mask)."""
    return make_subject(seed, index, abnormal=False, spacing=spacing, role=role)


def make_abnormal(seed: int, index: int = 0, family: str | None = None, spacing: float = 2.0,
                  role: str = "custom") -> SyntheticSubject:
    """An abnormal phantom with one lesion family (random when ``family`` is None) and its voxel mask."""
    return make_subject(seed, index, abnormal=True, family=family, spacing=spacing, role=role)


# ----------------------------------------------------------------------------------------------------------------
# Dataset on disk
# ----------------------------------------------------------------------------------------------------------------
def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI atomically (temporary file in the same folder + rename)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))


def make_dataset(out_dir: str | os.PathLike, n_train: int = 24, n_test: int = 32, seed: int = 0,
                 spacing: float = 2.0, progress: bool | Callable[[int, int, str], None] = True,
                 abnormal_fraction: float = 0.5, families: Sequence[str] = LESION_FAMILIES,
                 unregistered: bool = False) -> dict:
    """Write a phantom dataset (layout of the ``spmamba synth`` contract) and return a summary dict.

    ``OUT/train/normal-NNNN.nii.gz`` (normal), ``OUT/test/images/case-NNNN.nii.gz``,
    ``OUT/test/masks/case-NNNN.nii.gz`` (uint8 0/1, same grid; all zero for normal cases) and
    ``OUT/test/labels.csv`` with columns ``id,abnormal,family,lesion_voxels,n_lesions``.
    ``round(abnormal_fraction * n_test)`` test cases are abnormal, families cycling through ``families``, in an
    order shuffled by ``seed``. ``progress``: True for a tqdm bar on stderr, False for none, or a callable
    ``(done, total, id)``.

    ``unregistered``: every subject (training and test) as a scanner places it (``make_subject(pose="scanner")``),
    each on its own grid (affine, voxel order and shape vary; a mask shares its image's grid). labels.csv then has
    the extra columns ``shape,orientation,max_rotation_deg,shift_mm,scale_min,scale_max,warp_mm`` and
    ``OUT/poses.json`` holds every subject's pose (``params["pose"]``, with the 4x4 template-to-scanner matrix).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    if not 0.0 <= abnormal_fraction <= 1.0:
        raise ValueError("abnormal_fraction must be between 0 and 1")
    families = tuple(families)
    for f in families:
        if f not in LESION_FAMILIES:
            raise ValueError(f"unknown lesion family {f!r}; choose from {', '.join(LESION_FAMILIES)}")
    if not families:
        raise ValueError("families must not be empty")
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test" / "images").mkdir(parents=True, exist_ok=True)
    (out / "test" / "masks").mkdir(parents=True, exist_ok=True)

    n_abn = int(round(abnormal_fraction * n_test))
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 99])).permutation(n_test)
    plan_abnormal = np.zeros(n_test, dtype=bool)
    plan_abnormal[order[:n_abn]] = True
    fam_of = {}
    k = 0
    for i in range(n_test):
        if plan_abnormal[i]:
            fam_of[i] = families[k % len(families)]
            k += 1

    total = n_train + n_test
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="synth", unit="vol", leave=False)
    done = 0

    def tick(sid: str) -> None:
        nonlocal done
        done += 1
        if bar is not None:
            bar.set_postfix_str(sid, refresh=False)
            bar.update(1)
        elif callable(progress):
            progress(done, total, sid)

    tpl = load_template(float(spacing))
    pose = "scanner" if unregistered else "registered"
    poses: dict[str, dict] = {}
    shapes: list[tuple[int, ...]] = []
    try:
        for i in range(n_train):
            s = make_subject(seed, i, abnormal=False, spacing=spacing, role="train", subject_id=f"normal-{i:04d}",
                             pose=pose)
            _save_nifti(s.image, s.affine, out / "train" / f"{s.id}.nii.gz")
            if unregistered:
                poses[f"train/{s.id}"] = s.params["pose"]
                shapes.append(s.image.shape)
            tick(s.id)
        rows = []
        for i in range(n_test):
            s = make_subject(seed, i, abnormal=bool(plan_abnormal[i]), family=fam_of.get(i), spacing=spacing,
                             role="test", subject_id=f"case-{i:04d}", pose=pose)
            _save_nifti(s.image, s.affine, out / "test" / "images" / f"{s.id}.nii.gz")
            _save_nifti(s.mask, s.affine, out / "test" / "masks" / f"{s.id}.nii.gz")
            row = {"id": s.id, "abnormal": int(s.abnormal), "family": s.family,
                   "lesion_voxels": s.lesion_voxels, "n_lesions": s.params["n_lesions"]}
            if unregistered:
                ps = s.params["pose"]
                poses[f"test/{s.id}"] = ps
                shapes.append(s.image.shape)
                row.update({"shape": "x".join(str(n) for n in s.image.shape), "orientation": ps["orientation"],
                            "max_rotation_deg": round(max(abs(a) for a in ps["rotation_deg"]), 2),
                            "shift_mm": round(float(np.linalg.norm(ps["shift_mm"])), 2),
                            "scale_min": min(ps["scale"]), "scale_max": max(ps["scale"]), "warp_mm": ps["warp_mm"]})
            rows.append(row)
            tick(s.id)
    finally:
        if bar is not None:
            bar.close()

    labels = out / "test" / "labels.csv"
    fieldnames = ["id", "abnormal", "family", "lesion_voxels", "n_lesions"]
    if unregistered:
        fieldnames += ["shape", "orientation", "max_rotation_deg", "shift_mm", "scale_min", "scale_max", "warp_mm"]
    with atomic_path(labels) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)
    summary = {"out_dir": str(out), "n_train": n_train, "n_test": n_test, "n_abnormal": n_abn, "seed": int(seed),
               "spacing": float(spacing), "shape": list(tpl.shape), "families": list(families)}
    if unregistered:
        import json

        with atomic_path(out / "poses.json") as tmp:
            Path(tmp).write_text(json.dumps({"pose_ranges": {k: v for k, v in SCANNER_POSE.items()},
                                             "subjects": poses}, indent=1))
        summary.update(unregistered=True, shape=None,
                       shape_range=[[int(x) for x in np.min(shapes, axis=0)],
                                    [int(x) for x in np.max(shapes, axis=0)]] if shapes else None)
    return summary
