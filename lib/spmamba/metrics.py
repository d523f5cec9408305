"""Image-, pixel- and lesion-level metrics for anomaly heatmaps, streamed over any number of volumes.

Image level (one score per volume): AUROC, AP and F1-max from scikit-learn (``roc_auc_score``,
``average_precision_score``, ``precision_recall_curve``).

Pixel level (every voxel, pooled over the data set): AUROC and AP (scikit-learn, with ``sample_weight``), best
Dice (= the pixel F1-max of the pooled precision-recall curve: Dice and F1 are the same quantity) and AUPRO
(per-region overlap against the false-positive rate, integrated up to FPR 0.3 and divided by 0.3, as in MVTec AD).

Lesion level at one operating threshold (as in Spatial-MSMA): lesion-wise TPR (share of ground-truth connected
components touched by the prediction) and PPV (share of predicted components touching a ground-truth one), pooled
over volumes; HD99 and mean (symmetric) surface distance in mm per volume from ``monai.metrics``
(``compute_hausdorff_distance(percentile=99)``, ``compute_average_surface_distance(symmetric=True)``), averaged
over abnormal volumes whose prediction is not empty.

Memory: :class:`PixelMetricAccumulator` never keeps whole volumes. Per volume it keeps every lesion voxel and a
uniform random sample of at most ``max_negatives_per_volume`` normal voxels, each kept voxel weighted by the
number of voxels it stands for, so the weighted metrics are unbiased estimates of the all-voxel ones (exact when
nothing had to be sampled). When the pooled sample grows past ``max_samples`` it is thinned by half (weights
doubled). For AUPRO, each ground-truth region keeps at most ``region_quantiles`` order statistics of its scores.
``result["pixel"]["exact"]`` says whether any sampling happened.
"""
from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from spmamba.io import VOLUME_SUFFIXES, VolumeError, is_volume_file, load_volume, volume_id
from spmamba.results import ResultsError, heatmap_path, parse_abnormal, read_detect_meta, read_scores
from spmamba.scoring import abnormal_voxels

__all__ = [
    "image_metrics",
    "f1_max",
    "PixelMetricAccumulator",
    "aupro_from_regions",
    "lesion_metrics",
    "LesionMetricAccumulator",
    "evaluate_folder",
    "format_table",
    "EvaluationError",
]

_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-connected components in 3-D


class EvaluationError(ValueError):
    """Inputs to the evaluation are unusable (message names the file and the problem)."""


# ----------------------------------------------------------------------------------------------------------------
# Image level
# ----------------------------------------------------------------------------------------------------------------
def f1_max(labels: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None) -> tuple[float, float]:
    """Best F1 over all thresholds of the precision-recall curve and the threshold reaching it."""
    precision, recall, thresholds = precision_recall_curve(labels, scores, sample_weight=sample_weight)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = f1[:-1]  # the last point (recall 0, precision 1) has no threshold
    if f1.size == 0:
        return 0.0, float("nan")
    i = int(np.argmax(f1))
    return float(f1[i]), float(thresholds[i])


def image_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> dict:
    """Volume-level AUROC, AP and F1-max. NaN (with a ``note``) when only one class is present."""
    y = np.asarray(labels, dtype=int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    out = {"n": int(y.size), "n_abnormal": int(y.sum())}
    if y.size == 0 or y.min() == y.max():
        out.update(auroc=float("nan"), ap=float("nan"), f1_max=float("nan"), f1_threshold=float("nan"),
                   note="image metrics need both normal and abnormal volumes")
        return out
    f1, thr = f1_max(y, s)
    out.update(auroc=float(roc_auc_score(y, s)), ap=float(average_precision_score(y, s)), f1_max=f1,
               f1_threshold=thr)
    return out


def operating_point(labels: Sequence[int], predicted: Sequence[int]) -> dict:
    """Sensitivity, specificity and false-positive rate of binary volume decisions (the model's own threshold)."""
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    tp, fn = int((y & p).sum()), int((y & ~p).sum())
    fp, tn = int((~y & p).sum()), int((~y & ~p).sum())
    nan = float("nan")
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "sensitivity": tp / (tp + fn) if tp + fn else nan,
            "specificity": tn / (tn + fp) if tn + fp else nan,
            "fpr": fp / (tn + fp) if tn + fp else nan,
            "precision": tp / (tp + fp) if tp + fp else nan}


# ----------------------------------------------------------------------------------------------------------------
# Pixel level
# ----------------------------------------------------------------------------------------------------------------
def aupro_from_regions(neg_scores: np.ndarray, neg_weights: np.ndarray, regions: Sequence[np.ndarray],
                       max_fpr: float = 0.3, max_thresholds: int = 20000) -> float:
    """Normalised area under the PRO curve up to ``max_fpr``.

    ``neg_scores`` / ``neg_weights``: (weighted) scores of the voxels outside every ground-truth region.
    ``regions``: one sorted array of scores per ground-truth connected component.
    At threshold t a voxel is positive when score >= t; PRO(t) = mean over regions of the share of its voxels
    >= t; FPR(t) = weighted share of negatives >= t. The curve starts at (0, 0), is cut at ``max_fpr`` by linear
    interpolation and its trapezoidal area is divided by ``max_fpr`` (1.0 = perfect).
    """
    if len(regions) == 0:
        return float("nan")
    neg = np.asarray(neg_scores, dtype=np.float64)
    w = np.asarray(neg_weights, dtype=np.float64)
    if neg.size == 0 or w.sum() <= 0:
        return 1.0  # no normal voxel can be a false positive
    order = np.argsort(neg)
    neg, w = neg[order], w[order]
    tail = np.cumsum(w[::-1])[::-1]  # weight of negatives >= neg[i]
    total = tail[0]

    cand = np.unique(np.concatenate([neg] + [np.asarray(r, dtype=np.float64) for r in regions]))[::-1]
    if cand.size > max_thresholds:
        keep = np.unique(np.linspace(0, cand.size - 1, max_thresholds).round().astype(int))
        cand = cand[keep]
    idx = np.searchsorted(neg, cand, side="left")
    fpr = np.where(idx < neg.size, tail[np.minimum(idx, neg.size - 1)], 0.0) / total
    pro = np.zeros_like(cand)
    for r in regions:
        r = np.asarray(r, dtype=np.float64)
        pro += 1.0 - np.searchsorted(r, cand, side="left") / r.size
    pro /= len(regions)

    fpr = np.concatenate([[0.0], fpr, [1.0]])
    pro = np.concatenate([[0.0], pro, [1.0]])
    fpr = np.maximum.accumulate(fpr)
    pro = np.maximum.accumulate(pro)
    cut = int(np.searchsorted(fpr, max_fpr, side="right"))  # first point beyond max_fpr
    xs, ys = fpr[:cut], pro[:cut]
    if cut < fpr.size and fpr[cut - 1] < max_fpr:
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.append(xs, max_fpr), np.append(ys, y_cut)
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
    return area / max_fpr


@dataclass
class PixelMetricAccumulator:
    """Pools voxel scores over volumes (bounded memory) for pixel AUROC, AP, best Dice and AUPRO.

    Call :meth:`add` once per volume with the heatmap and the 0/1 mask (same shape) and, optionally, a
    boolean ``region`` (e.g. the brain) outside which voxels are ignored; then :meth:`compute`.
    """

    max_negatives_per_volume: int = 200_000
    max_positives_per_volume: int = 200_000
    max_samples: int = 4_000_000
    region_quantiles: int = 1000
    max_fpr: float = 0.3
    seed: int = 0
    _scores: list = field(default_factory=list, repr=False)
    _labels: list = field(default_factory=list, repr=False)
    _weights: list = field(default_factory=list, repr=False)
    _regions: list = field(default_factory=list, repr=False)
    _n_stored: int = 0
    _exact: bool = True
    _n_voxels: int = 0
    _n_volumes: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def _take(self, values: np.ndarray, cap: int) -> tuple[np.ndarray, float]:
        if values.size <= cap:
            return values, 1.0
        self._exact = False
        pick = self._rng.choice(values.size, size=cap, replace=False)
        return values[pick], values.size / cap

    def add(self, heatmap: np.ndarray, mask: np.ndarray, region: np.ndarray | None = None) -> None:
        heatmap = np.asarray(heatmap, dtype=np.float32)
        gt = np.asarray(mask) > 0
        if heatmap.shape != gt.shape:
            raise ValueError(f"heatmap shape {heatmap.shape} differs from mask shape {gt.shape}")
        if region is not None:
            region = np.asarray(region, dtype=bool)
            gt = gt & region
            neg_vals = heatmap[region & ~gt]
        else:
            neg_vals = heatmap[~gt]
        pos_vals = heatmap[gt]
        self._n_voxels += int(neg_vals.size + pos_vals.size)
        self._n_volumes += 1
        for vals, lab, cap in ((neg_vals, 0, self.max_negatives_per_volume),
                               (pos_vals, 1, self.max_positives_per_volume)):
            if vals.size == 0:
                continue
            kept, w = self._take(vals, cap)
            self._scores.append(kept.astype(np.float32))
            self._labels.append(np.full(kept.size, lab, dtype=np.uint8))
            self._weights.append(np.full(kept.size, w, dtype=np.float32))
            self._n_stored += kept.size
        if gt.any():
            lab, n = ndimage.label(gt, structure=_CONNECTIVITY)
            if n:
                order = np.argsort(lab.ravel(), kind="stable")
                sorted_lab = lab.ravel()[order]
                vals = heatmap.ravel()[order]
                starts = np.searchsorted(sorted_lab, np.arange(1, n + 1), side="left")
                ends = np.searchsorted(sorted_lab, np.arange(1, n + 1), side="right")
                for a, b in zip(starts, ends):
                    r = np.sort(vals[a:b])
                    if r.size > self.region_quantiles:
                        self._exact = False
                        r = r[np.linspace(0, r.size - 1, self.region_quantiles).round().astype(int)]
                    self._regions.append(r)
        if self._n_stored > self.max_samples:
            self._thin()

    def _thin(self) -> None:
        self._exact = False
        s, l, w = self._pooled()
        keep = self._rng.random(s.size) < 0.5
        self._scores, self._labels, self._weights = [s[keep]], [l[keep]], [w[keep] * 2.0]
        self._n_stored = int(keep.sum())

    def _pooled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._scores:
            return np.zeros(0, np.float32), np.zeros(0, np.uint8), np.zeros(0, np.float32)
        return np.concatenate(self._scores), np.concatenate(self._labels), np.concatenate(self._weights)

    def compute(self) -> dict:
        s, y, w = self._pooled()
        out = {"n_volumes": self._n_volumes, "n_voxels": self._n_voxels, "n_samples": int(s.size),
               "exact": self._exact, "n_regions": len(self._regions)}
        nan = float("nan")
        if s.size == 0 or y.min() == y.max():
            out.update(auroc=nan, ap=nan, aupro=nan, best_dice=nan, best_dice_threshold=nan,
                       note="pixel metrics need both lesion and normal voxels")
            return out
        wd = w.astype(np.float64)
        out["auroc"] = float(roc_auc_score(y, s, sample_weight=wd))
        out["ap"] = float(average_precision_score(y, s, sample_weight=wd))
        dice, thr = f1_max(y, s, sample_weight=wd)
        out["best_dice"], out["best_dice_threshold"] = dice, thr
        neg = y == 0
        out["aupro"] = aupro_from_regions(s[neg], wd[neg], self._regions, max_fpr=self.max_fpr)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Lesion level
# ----------------------------------------------------------------------------------------------------------------
def _surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """HD99 and symmetric mean surface distance (mm) between two non-empty binary volumes, via monai.metrics."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    g = torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float32))[None, None]
    sp = [float(x) for x in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, g, include_background=True, percentile=99, spacing=sp)
        msd = compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=sp)
    return float(hd.reshape(-1)[0]), float(msd.reshape(-1)[0])


def lesion_metrics(heatmap: np.ndarray, mask: np.ndarray, threshold: float,
                   spacing: Sequence[float] = (1.0, 1.0, 1.0), min_region_voxels: int = 1) -> dict:
    """Lesion-level counts and distances for one volume at ``threshold`` (predicted = the abnormal voxels,
    ``spmamba.scoring.abnormal_voxels``: heatmap >= threshold).

    Predicted components smaller than ``min_region_voxels`` are dropped. Returns counts (``n_gt``,
    ``n_gt_detected``, ``n_pred``, ``n_pred_true``), ``dice`` and, when both prediction and ground truth are
    non-empty, ``hd99_mm`` and ``msd_mm`` (otherwise NaN).
    """
    gt = np.asarray(mask) > 0
    pred = abnormal_voxels(heatmap, threshold)
    if pred.shape != gt.shape:
        raise ValueError(f"heatmap shape {pred.shape} differs from mask shape {gt.shape}")
    plab, n_pred = ndimage.label(pred, structure=_CONNECTIVITY)
    if min_region_voxels > 1 and n_pred:
        sizes = np.bincount(plab.ravel())
        small = np.nonzero(sizes < min_region_voxels)[0]
        small = small[small > 0]
        if small.size:
            pred = pred & ~np.isin(plab, small)
            plab, n_pred = ndimage.label(pred, structure=_CONNECTIVITY)
    glab, n_gt = ndimage.label(gt, structure=_CONNECTIVITY)
    gt_hit = np.unique(glab[pred & gt])
    pred_hit = np.unique(plab[pred & gt])
    inter, total = int((pred & gt).sum()), int(pred.sum() + gt.sum())
    out = {"n_gt": int(n_gt), "n_gt_detected": int((gt_hit > 0).sum()), "n_pred": int(n_pred),
           "n_pred_true": int((pred_hit > 0).sum()), "intersection": inter, "pred_voxels": int(pred.sum()),
           "gt_voxels": int(gt.sum()), "dice": (2.0 * inter / total) if total else 1.0,
           "hd99_mm": float("nan"), "msd_mm": float("nan")}
    if pred.any() and gt.any():
        out["hd99_mm"], out["msd_mm"] = _surface_distances(pred, gt, spacing)
    return out


@dataclass
class LesionMetricAccumulator:
    """Pools :func:`lesion_metrics` over volumes: lesion-wise TPR / PPV, mean HD99 / MSD, Dice at threshold."""

    threshold: float
    min_region_voxels: int = 1
    _rows: list = field(default_factory=list, repr=False)

    def add(self, heatmap: np.ndarray, mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict:
        row = lesion_metrics(heatmap, mask, self.threshold, spacing, self.min_region_voxels)
        self._rows.append(row)
        return row

    def compute(self) -> dict:
        rows = self._rows
        nan = float("nan")
        n_gt = sum(r["n_gt"] for r in rows)
        n_pred = sum(r["n_pred"] for r in rows)
        hd = [r["hd99_mm"] for r in rows if not math.isnan(r["hd99_mm"])]
        msd = [r["msd_mm"] for r in rows if not math.isnan(r["msd_mm"])]
        inter = sum(r["intersection"] for r in rows)
        tot = sum(r["pred_voxels"] + r["gt_voxels"] for r in rows)
        abn = [r for r in rows if r["n_gt"] > 0]
        return {
            "threshold": float(self.threshold),
            "min_region_voxels": int(self.min_region_voxels),
            "n_gt_lesions": n_gt,
            "n_pred_regions": n_pred,
            "tpr": sum(r["n_gt_detected"] for r in rows) / n_gt if n_gt else nan,
            "ppv": sum(r["n_pred_true"] for r in rows) / n_pred if n_pred else nan,
            "hd99_mm": float(np.mean(hd)) if hd else nan,
            "msd_mm": float(np.mean(msd)) if msd else nan,
            "n_surface_volumes": len(hd),
            "n_abnormal_with_empty_prediction": sum(1 for r in abn if r["pred_voxels"] == 0),
            "dice_global": 2.0 * inter / tot if tot else nan,
            "dice_mean_abnormal": float(np.mean([r["dice"] for r in abn])) if abn else nan,
        }


# ----------------------------------------------------------------------------------------------------------------
# Folder evaluation (what ``spmamba evaluate`` runs)
# ----------------------------------------------------------------------------------------------------------------
def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of a volume; errors name the file."""
    try:
        v = load_volume(path)
    except VolumeError as exc:
        raise EvaluationError(str(exc)) from exc
    return v.array, v.affine


def _read_labels(path: Path) -> dict[str, bool]:
    if not path.exists():
        raise EvaluationError(f"{path}: labels file not found")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"id", "abnormal"} <= set(reader.fieldnames):
            raise EvaluationError(f"{path}: needs columns id,abnormal (found {reader.fieldnames})")
        out = {}
        for i, r in enumerate(reader, start=2):
            try:
                out[volume_id(r["id"])] = parse_abnormal(r["abnormal"])
            except ValueError as exc:
                raise EvaluationError(f"{path}, line {i}: {exc}") from exc
    return out


def _index_masks(masks_dir: Path) -> dict[str, Path]:
    if not masks_dir.is_dir():
        raise EvaluationError(f"{masks_dir}: masks folder not found")
    out: dict[str, Path] = {}
    for p in sorted(masks_dir.iterdir()):
        if p.name.startswith(".") or not is_volume_file(p):
            continue
        sid = volume_id(p)
        for suffix in ("_mask", "_seg", "_label"):
            if sid.endswith(suffix) and sid[: -len(suffix)]:
                out.setdefault(sid[: -len(suffix)], p)
        out[sid] = p
    return out


def _spacing(affine: np.ndarray) -> list[float]:
    return [float(x) for x in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]


def evaluate_folder(pred_dir: str | Path, masks_dir: str | Path, labels_csv: str | Path | None = None, *,
                    threshold: float | None = None, images_dir: str | Path | None = None,
                    min_region_voxels: int = 1, max_fpr: float = 0.3,
                    progress: Callable[[int, int, str], None] | None = None,
                    accumulator: PixelMetricAccumulator | None = None) -> dict:
    """Metrics for a ``spmamba detect`` output folder against ground-truth masks.

    ``pred_dir``: ``scores.csv`` + ``<id>_anomaly.nii.gz`` (+ optional ``detect.json`` with ``pixel_threshold``).
    ``masks_dir``: ``<id>.nii.gz`` (or ``<id>_mask`` / ``_seg`` / ``_label``; .nii/.nrrd too), 0 = normal voxel.
    ``labels_csv``: id,abnormal; without it a volume is abnormal when its mask has a lesion voxel. A volume
    labelled normal with no mask file counts as an empty mask; an abnormal one without a mask is left out of
    pixel and lesion metrics (listed in ``warnings``).
    ``threshold``: heatmap threshold for lesion metrics; default ``pixel_threshold`` from detect.json (the
    model's calibrated threshold), else the best-Dice threshold (optimistic; said in ``lesion.threshold_source``).
    ``images_dir``: when given, pixel metrics count only voxels where the input image is non-zero (foreground).
    Volumes are read one at a time (twice when the threshold must come from the best Dice).
    """
    pred_dir, masks_dir = Path(pred_dir), Path(masks_dir)
    if not pred_dir.is_dir():
        raise EvaluationError(f"{pred_dir}: prediction folder not found")
    try:
        scores = read_scores(pred_dir)
        detect_meta = read_detect_meta(pred_dir)
    except ResultsError as exc:
        raise EvaluationError(str(exc)) from exc
    if not scores:
        raise EvaluationError(f"{pred_dir / 'scores.csv'}: has no rows")
    masks = _index_masks(masks_dir)
    labels = _read_labels(Path(labels_csv)) if labels_csv else None
    warn: list[str] = []
    source = "argument"
    if threshold is None and detect_meta.get("pixel_threshold") is not None:
        threshold, source = float(detect_meta["pixel_threshold"]), "model (detect.json pixel_threshold)"

    ids = list(scores)
    y_img, s_img, dec = [], [], []
    plan: list[tuple[str, Path, Path | None]] = []
    for sid in ids:
        hm = heatmap_path(pred_dir, sid)
        mpath = masks.get(sid)
        if labels is not None:
            if sid not in labels:
                raise EvaluationError(f"{labels_csv}: no row for id {sid!r} (listed in {pred_dir / 'scores.csv'})")
            lab = labels[sid]
        else:
            lab = None
        y_img.append(lab)
        s_img.append(scores[sid]["score"])
        dec.append(scores[sid]["abnormal"])
        if not hm.exists():
            raise EvaluationError(f"{hm}: heatmap listed in scores.csv is missing")
        if mpath is None and lab is not True and labels is not None:
            plan.append((sid, hm, None))
        elif mpath is None:
            if labels is None:
                raise EvaluationError(f"{masks_dir}: no mask for {sid!r} (and no --labels to say it is normal)")
            warn.append(f"{sid}: abnormal but no mask in {masks_dir}; left out of pixel and lesion metrics")
        else:
            plan.append((sid, hm, mpath))

    acc = accumulator or PixelMetricAccumulator(max_fpr=max_fpr)
    per_volume: list[dict] = []

    n_passes = 1 if threshold is not None else 2

    def volumes(pass_no: int = 0):
        for k, (sid, hm, mpath) in enumerate(plan):
            h, h_aff = _read(hm)
            if mpath is not None:
                m, _ = _read(mpath)
                if m.shape != h.shape:
                    raise EvaluationError(f"{mpath}: mask shape {m.shape} differs from heatmap {hm} shape {h.shape}")
                if not np.all(np.isin(np.unique(m), (0, 1))):
                    m = m > 0.5 if m.max() <= 1 else m > 0
            else:
                m = np.zeros(h.shape, dtype=np.uint8)
            region = None
            if images_dir is not None:
                ip = _find_image(Path(images_dir), sid)
                img, _ = _read(ip)
                if img.shape != h.shape:
                    raise EvaluationError(f"{ip}: image shape {img.shape} differs from heatmap {hm} shape {h.shape}")
                region = img != 0
            if progress:
                progress(pass_no * len(plan) + k + 1, n_passes * len(plan), sid)
            yield sid, h, (np.asarray(m) > 0), region, _spacing(h_aff)

    mask_has_lesion: dict[str, bool] = {}

    def lesion_row(les: LesionMetricAccumulator, sid, h, m, region, sp) -> None:
        if region is not None:
            h = np.where(region, h, -np.inf)
        row = les.add(h, m, sp)
        per_volume.append({"id": sid, **{k: row[k] for k in ("n_gt", "n_gt_detected", "n_pred", "n_pred_true",
                                                             "dice", "hd99_mm", "msd_mm")}})

    # One pass when the threshold is known; otherwise a second pass at the best-Dice threshold.
    les = LesionMetricAccumulator(threshold=float(threshold), min_region_voxels=min_region_voxels) \
        if threshold is not None else None
    for sid, h, m, region, sp in volumes():
        acc.add(h, m, region)
        mask_has_lesion[sid] = bool(m.any())
        if les is not None:
            lesion_row(les, sid, h, m, region, sp)
    pixel = acc.compute()
    if les is None:
        threshold, source = pixel.get("best_dice_threshold", float("nan")), "best Dice threshold (optimistic)"
        if not math.isnan(threshold):
            les = LesionMetricAccumulator(threshold=float(threshold), min_region_voxels=min_region_voxels)
            for sid, h, m, region, sp in volumes(1):
                lesion_row(les, sid, h, m, region, sp)

    lesion: dict
    if les is None:
        lesion = {"note": "no threshold available (pixel metrics undefined)"}
    else:
        lesion = les.compute()
        lesion["threshold_source"] = source

    for i, sid in enumerate(ids):
        if y_img[i] is None:
            y_img[i] = mask_has_lesion.get(sid, False)
    image = image_metrics([int(v) for v in y_img], s_img)
    if all(d is not None for d in dec):
        image["at_model_threshold"] = operating_point([int(v) for v in y_img], [int(d) for d in dec])
    result = {
        "n_volumes": len(ids),
        "n_abnormal": int(sum(bool(v) for v in y_img)),
        "image": image,
        "pixel": pixel,
        "lesion": lesion,
        "pixel_region": "foreground (image != 0)" if images_dir is not None else "all voxels",
        "model": {k: detect_meta.get(k) for k in ("model", "version", "pixel_threshold") if k in detect_meta},
        "warnings": warn,
        "per_volume": per_volume,
    }
    return result


def _find_image(images_dir: Path, sid: str) -> Path:
    for e in VOLUME_SUFFIXES:
        p = images_dir / f"{sid}{e}"
        if p.exists():
            return p
    raise EvaluationError(f"{images_dir}: no image for {sid!r}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def format_table(result: dict) -> str:
    """A plain-text table of the headline numbers of :func:`evaluate_folder`."""
    im, px, le = result["image"], result["pixel"], result.get("lesion", {})
    rows = [
        ("volumes (abnormal)", f"{result['n_volumes']} ({result['n_abnormal']})"),
        ("image AUROC", _fmt(im.get("auroc"))),
        ("image AP", _fmt(im.get("ap"))),
        ("image F1-max", _fmt(im.get("f1_max"))),
    ]
    op = im.get("at_model_threshold")
    if op:
        rows += [("sensitivity @ model thr", _fmt(op["sensitivity"])),
                 ("specificity @ model thr", _fmt(op["specificity"]))]
    rows += [
        ("pixel AUROC", _fmt(px.get("auroc"))),
        ("pixel AP", _fmt(px.get("ap"))),
        ("pixel AUPRO (FPR<=0.3)", _fmt(px.get("aupro"))),
        ("pixel best Dice", _fmt(px.get("best_dice"))),
    ]
    if "tpr" in le:
        rows += [
            ("lesion threshold", f"{_fmt(le['threshold'])} ({le.get('threshold_source', '')})"),
            ("lesion-wise TPR", _fmt(le["tpr"])),
            ("lesion-wise PPV", _fmt(le["ppv"])),
            ("HD99 (mm)", _fmt(le["hd99_mm"])),
            ("mean surface dist. (mm)", _fmt(le["msd_mm"])),
            ("Dice @ threshold", _fmt(le["dice_global"])),
        ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(w)}  {v}" for k, v in rows]
    if not px.get("exact", True):
        lines.append(f"(pixel metrics from a weighted sample of {px['n_samples']} of {px['n_voxels']} voxels)")
    for msg in result.get("warnings", []):
        lines.append(f"warning: {msg}")
    return "\n".join(lines)
