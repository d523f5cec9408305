"""The lesion evaluation protocol of Spatial-MSMA's public code (``ahsanMah/sade``, ``sade/run/eval.py``
``segmentation_evaluator`` and ``sade/metrics.py``), beside the product's own (``spmamba.metrics``); what
``spmamba evaluate --protocol sade`` runs. Re-implemented from its description, step by step:

1. Brain mask = image > its minimum; eroded by a ball of radius 2 voxels.
2. Thresholds: the heatmaps of **normal** volumes, shifted to a minimum of 0 and multiplied by their eroded brain
   mask; their non-zero values pooled; the threshold of a voxel false-positive rate ``fpr`` is the value exceeded by
   that share of them (the code searches it by golden section; here: the (1 - fpr) quantile). The code reports
   fpr 0.05 and 0.10.
3. Per abnormal volume: ground truth = mask x eroded brain mask; prediction = (heatmap - its minimum) x eroded brain
   mask > threshold. Both are post-processed: components (18-connected) smaller than 3 voxels dropped; the
   prediction then dilated by a 6-connected cross (a ball of radius 1).
4. Per volume, on 26-connected components: TP = ground-truth lesions touched by the prediction, FN = the others,
   FP = predicted components touching no lesion; TPR = TP / lesions, PPV = TP / (TP + FP) (the code's definition,
   which mixes lesion and component counts); HD99 = the 99th percentile of the **directed** distances from the
   ground truth's surface to the prediction's, MSD = the mean of those distances (MONAI; in voxels as the code, and
   in mm); Dice.
5. Summary: the mean of every metric over the volumes where none is undefined (the code's ``dropna().describe()``:
   a volume with an empty prediction, or without a lesion, is left out), with their count, and the pooled TPR / PPV.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from scipy import ndimage

from spmamba.metrics import EvaluationError, _find_image, _index_masks, _read, _spacing
from spmamba.results import ResultsError, heatmap_path, read_scores

__all__ = ["DEFAULT_FPRS", "ball", "brain_masks", "post_process", "voxel_threshold", "normal_values",
           "volume_metrics", "sade_protocol", "evaluate_sade", "format_sade_table"]

DEFAULT_FPRS = (0.05, 0.10)
ERODE_RADIUS = 2
MIN_COMPONENT = 3
_FACE = ndimage.generate_binary_structure(3, 1)  # 6-connected: the ball of radius 1
_EDGE = ndimage.generate_binary_structure(3, 2)  # 18-connected (skimage connectivity=2): post-processing
_FULL = ndimage.generate_binary_structure(3, 3)  # 26-connected (connectivity=3): lesion counting


def ball(radius: int) -> np.ndarray:
    """A digital ball: voxels within ``radius`` of the centre. -> (2r+1,) * 3 bool."""
    r = int(radius)
    z, y, x = np.ogrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (x * x + y * y + z * z) <= r * r


def brain_masks(image: np.ndarray, radius: int = ERODE_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """(brain = image > min(image), brain eroded by a ball of ``radius`` voxels), both bool of the image's shape."""
    brain = np.asarray(image) > np.min(image)
    return brain, ndimage.binary_erosion(brain, structure=ball(radius))


def post_process(mask: np.ndarray, min_component: int = MIN_COMPONENT, dilate: bool = False) -> np.ndarray:
    """Drop 18-connected components smaller than ``min_component`` voxels; ``dilate``: then dilate by a ball of
    radius 1 (6-connected cross)."""
    lab, n = ndimage.label(np.asarray(mask) > 0, structure=_EDGE)
    if n:
        sizes = np.bincount(lab.ravel())
        keep = sizes >= min_component
        keep[0] = False
        out = keep[lab]
    else:
        out = np.zeros(lab.shape, dtype=bool)
    return ndimage.binary_dilation(out, structure=_FACE) if dilate else out


def normal_values(heatmap: np.ndarray, eroded: np.ndarray) -> np.ndarray:
    """The values a normal volume contributes to the thresholds: the non-zero entries of (heatmap - its minimum)
    x eroded brain mask. -> (M,) float64."""
    shifted = (np.asarray(heatmap, dtype=np.float64) - float(np.min(heatmap))) * eroded
    return shifted[shifted != 0]


def voxel_threshold(values: np.ndarray, fpr: float) -> float:
    """The threshold that the share ``fpr`` of the normal ``values`` exceeds: their (1 - fpr) quantile."""
    if values.size == 0:
        raise EvaluationError("no normal heatmap values inside the eroded brain masks to set the thresholds from")
    return float(np.quantile(values, 1.0 - float(fpr)))


def _directed_distances(gt: np.ndarray, pred: np.ndarray, spacing: Optional[Sequence[float]]) -> tuple[float, float]:
    """(HD99, mean) of the distances from the ground truth's surface to the prediction's (MONAI, directed)."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    g = torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float32))[None, None]
    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    sp = None if spacing is None else [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # MONAI measures from its first argument's surface to its second's: ground truth first, as the code does
        hd = compute_hausdorff_distance(g, p, include_background=True, percentile=99, directed=True, spacing=sp)
        msd = compute_average_surface_distance(g, p, include_background=True, symmetric=False, spacing=sp)
    return float(hd.reshape(-1)[0]), float(msd.reshape(-1)[0])


def volume_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict:
    """The code's per-volume metrics of a post-processed prediction against a post-processed ground truth (both
    bool, same shape); undefined ones are NaN (no lesion: TPR; no prediction touching: PPV; an empty mask: the
    distances)."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    glab, n_gt = ndimage.label(gt, structure=_FULL)
    plab, n_pred = ndimage.label(pred, structure=_FULL)
    tp = int(np.count_nonzero(np.unique(glab[pred & gt])))
    fp = n_pred - int(np.count_nonzero(np.unique(plab[pred & gt])))
    nan = float("nan")
    row = {"tp": tp, "fn": n_gt - tp, "fp": fp, "n_gt": int(n_gt), "n_pred": int(n_pred),
           "tpr": tp / n_gt if n_gt else nan, "ppv": tp / (tp + fp) if tp + fp else nan,
           "dice": 2.0 * int((pred & gt).sum()) / int(pred.sum() + gt.sum()) if pred.any() or gt.any() else nan,
           "hd99_vox": nan, "msd_vox": nan, "hd99_mm": nan, "msd_mm": nan}
    if pred.any() and gt.any():
        row["hd99_vox"], row["msd_vox"] = _directed_distances(gt, pred, None)
        row["hd99_mm"], row["msd_mm"] = _directed_distances(gt, pred, spacing)
    return row


_SUMMARY_KEYS = ("tpr", "ppv", "dice", "hd99_vox", "msd_vox", "hd99_mm", "msd_mm")


def _summary(rows: list[dict]) -> dict:
    complete = [r for r in rows if all(math.isfinite(r[k]) for k in _SUMMARY_KEYS)]
    out = {k: float(np.mean([r[k] for r in complete])) if complete else float("nan") for k in _SUMMARY_KEYS}
    tp, fn, fp = (sum(r[k] for r in rows) for k in ("tp", "fn", "fp"))
    out.update({"n_volumes": len(rows), "n_volumes_summarised": len(complete),
                "tpr_pooled": tp / (tp + fn) if tp + fn else float("nan"),
                "ppv_pooled": tp / (tp + fp) if tp + fp else float("nan")})
    return out


def sade_protocol(normals: Iterable[tuple[str, np.ndarray, np.ndarray]],
                  cases: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray, Sequence[float]]], *,
                  fprs: Sequence[float] = DEFAULT_FPRS, max_values_per_volume: int = 500_000, seed: int = 0) -> dict:
    """The protocol (module docstring) on arrays. ``normals``: (id, heatmap, image) of normal volumes, which set the
    thresholds (held-out normals, not those the model was trained on, for an honest false-positive rate);
    ``cases``: (id, heatmap, image, mask, voxel spacing in mm) of the test volumes, each array of one shape; those
    with a lesion voxel inside the eroded brain are evaluated. Both may be generators (read one volume at a time);
    ``normals`` is consumed first. At most ``max_values_per_volume`` values of each normal volume enter the
    thresholds (a seeded uniform sample)."""
    fprs = [float(f) for f in fprs]
    if not fprs or any(not 0.0 < f < 1.0 for f in fprs):
        raise EvaluationError(f"voxel false-positive rates must be between 0 and 1, got {fprs}")
    rng = np.random.default_rng(seed)
    pooled = []
    for sid, heat, img in normals:
        _same_shape(img, heat, sid)
        vals = normal_values(heat, brain_masks(img)[1])
        if vals.size > max_values_per_volume:
            vals = rng.choice(vals, max_values_per_volume, replace=False)
        pooled.append(vals)
    if not pooled:
        raise EvaluationError("no normal heatmaps to set the thresholds from")
    values = np.concatenate(pooled)
    thresholds = {f: voxel_threshold(values, f) for f in fprs}

    rows: dict[float, list[dict]] = {f: [] for f in fprs}
    skipped = []
    for sid, heat, img, mask, spacing in cases:
        _same_shape(img, heat, sid)
        _same_shape(mask, heat, sid)
        eroded = brain_masks(img)[1]
        gt = post_process((np.asarray(mask) > 0) & eroded)
        if not gt.any():
            skipped.append(sid)  # a normal volume (or a lesion outside the eroded brain): not in the protocol
            continue
        shifted = (np.asarray(heat, dtype=np.float64) - float(np.min(heat))) * eroded
        for f in fprs:
            pred = post_process(shifted > thresholds[f], dilate=True)
            rows[f].append({"id": sid, **volume_metrics(pred, gt, spacing)})
    return {
        "protocol": "sade (ahsanMah/sade segmentation_evaluator)",
        "n_normal_volumes": len(pooled), "n_normal_values": int(values.size),
        "thresholds": {f"{f:g}": t for f, t in thresholds.items()},
        "at_fpr": {f"{f:g}": _summary(rows[f]) for f in fprs},
        "per_volume": {f"{f:g}": rows[f] for f in fprs},
        "not_evaluated": skipped,
    }


def evaluate_sade(pred_dir: str | Path, masks_dir: str | Path, images_dir: str | Path,
                  normal_pred_dir: str | Path, normal_images_dir: str | Path, *,
                  fprs: Sequence[float] = DEFAULT_FPRS, max_values_per_volume: int = 500_000, seed: int = 0,
                  progress: Optional[Callable[[int, int, str], None]] = None) -> dict:
    """:func:`sade_protocol` on ``spmamba detect`` output folders: ``pred_dir`` (the abnormal test volumes; those
    whose mask has a lesion voxel are evaluated), ``masks_dir`` (``<id>.nii.gz``, or ``_mask`` / ``_seg`` /
    ``_label``), ``images_dir`` (their input images: the brain masks), ``normal_pred_dir`` and
    ``normal_images_dir`` (the detect output and images of normal volumes: the thresholds)."""
    try:
        test_scores, normal_scores = read_scores(pred_dir), read_scores(normal_pred_dir)
    except ResultsError as exc:
        raise EvaluationError(str(exc)) from exc
    if not normal_scores:
        raise EvaluationError(f"{Path(normal_pred_dir) / 'scores.csv'}: has no rows (no normal heatmaps)")
    total = len(normal_scores) + len(test_scores)
    masks = _index_masks(Path(masks_dir))
    skipped = []

    def normals():
        for k, sid in enumerate(normal_scores):
            h, _ = _read(_existing(heatmap_path(normal_pred_dir, sid)))
            img, _ = _read(_find_image(Path(normal_images_dir), sid))
            yield sid, h, img
            if progress:
                progress(k + 1, total, sid)

    def cases():
        for k, sid in enumerate(test_scores):
            if progress:
                progress(len(normal_scores) + k + 1, total, sid)
            if sid not in masks:
                skipped.append(sid)
                continue
            h, aff = _read(_existing(heatmap_path(pred_dir, sid)))
            m, _ = _read(masks[sid])
            img, _ = _read(_find_image(Path(images_dir), sid))
            yield sid, h, img, m, _spacing(aff)

    result = sade_protocol(normals(), cases(), fprs=fprs, max_values_per_volume=max_values_per_volume, seed=seed)
    result["not_evaluated"] = skipped + result["not_evaluated"]
    return result


def _existing(path: Path) -> Path:
    if not path.exists():
        raise EvaluationError(f"{path}: heatmap listed in scores.csv is missing")
    return path


def _same_shape(a: np.ndarray, heat: np.ndarray, sid: str) -> None:
    if np.shape(a) != np.shape(heat):
        raise EvaluationError(f"{sid}: shape {np.shape(a)} differs from its heatmap's {np.shape(heat)}")


def format_sade_table(result: dict) -> str:
    """A plain-text table of :func:`evaluate_sade`'s summary, one column per false-positive rate."""
    fprs = list(result["at_fpr"])
    lines = [f"sade protocol: {result['n_normal_volumes']} normal volumes set the thresholds",
             f"{'voxel FPR':<28}" + "".join(f"{f:>12}" for f in fprs),
             f"{'threshold':<28}" + "".join(f"{result['thresholds'][f]:>12.4g}" for f in fprs)]
    names = (("volumes (summarised)", None), ("lesion TPR", "tpr"), ("lesion PPV", "ppv"), ("Dice", "dice"),
             ("HD99 GT->pred (voxels)", "hd99_vox"), ("MSD GT->pred (voxels)", "msd_vox"),
             ("HD99 GT->pred (mm)", "hd99_mm"), ("MSD GT->pred (mm)", "msd_mm"),
             ("lesion TPR pooled", "tpr_pooled"), ("lesion PPV pooled", "ppv_pooled"))
    for label, key in names:
        if key is None:
            cells = [f"{s['n_volumes']} ({s['n_volumes_summarised']})" for s in result["at_fpr"].values()]
        else:
            cells = ["nan" if not math.isfinite(s[key]) else f"{s[key]:.4f}" for s in result["at_fpr"].values()]
        lines.append(f"{label:<28}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)
