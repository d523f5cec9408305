"""Figures: the PNG mosaic of a volume with its heatmap (``spmamba detect --png``), drawn with matplotlib (imported on
first use, Agg backend)."""
from __future__ import annotations

import os

__all__ = ["save_mosaic", "to_ras"]


def save_mosaic(image, heatmap, pixel_threshold: float, path: str | os.PathLike, *, axis: int = 2, n: int = 12,
                title: str = "", origin: str = "lower") -> None:
    """PNG mosaic of ``n`` slices along ``axis``: the image in grey, the heatmap faintly over the foreground
    (colour from its median to its maximum), strongly where it reaches ``pixel_threshold`` (what the model calls
    abnormal), outlined in cyan. Slices are spread over the non-zero extent and always include the peak slice.
    Each slice is drawn with its first remaining axis across and the second one up (``origin="lower"``, for RAS
    volumes) or down (``"upper"``: how image viewers show a 2-D image stored as (columns, rows)).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from spmamba.scoring import abnormal_voxels

    img = np.moveaxis(np.asarray(image, dtype=np.float32), axis, -1)
    hm = np.moveaxis(np.asarray(heatmap, dtype=np.float32), axis, -1)
    nz = np.nonzero(np.any(img != 0, axis=(0, 1)))[0]
    lo, hi = (int(nz[0]), int(nz[-1])) if nz.size else (0, img.shape[2] - 1)
    n = max(1, min(n, hi - lo + 1))
    picks = list(np.unique(np.linspace(lo, hi, n + 2)[1:-1].round().astype(int))) if n > 1 else [lo]
    peak = int(np.unravel_index(int(np.argmax(hm)), hm.shape)[2])
    if peak not in picks:
        picks[int(np.argmin([abs(p - peak) for p in picks]))] = peak
        picks = sorted(set(picks))
    cols = min(6, len(picks))
    rows = int(np.ceil(len(picks) / cols))
    fg_mask = img != 0
    fg = img[fg_mask]
    vmin, vmax = (np.percentile(fg, [1, 99]) if fg.size else (0.0, 1.0))
    hfg = hm[fg_mask] if fg.size else hm.ravel()
    hmax = float(np.nanmax(hm)) if np.isfinite(hm).any() else 1.0
    hlo = float(np.percentile(hfg, 50)) if hfg.size else 0.0
    hhi = max(hmax, pixel_threshold) if np.isfinite(pixel_threshold) else hmax
    hlo = min(hlo, hhi - 1e-6)
    tile = 2.4 if len(picks) > 1 else 5.0  # one slice (a 2-D image): one larger tile, room for the title
    fig, axes = plt.subplots(rows, cols, figsize=(tile * cols, (tile + 0.2) * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), picks):
        ax.imshow(img[:, :, k].T, cmap="gray", origin=origin, vmin=vmin, vmax=vmax, interpolation="nearest")
        h = hm[:, :, k].T
        inside = fg_mask[:, :, k].T
        # faint heatmap over the brain, strong where the model calls a voxel abnormal, contour at the threshold
        ax.imshow(np.ma.masked_where(~inside | (h < hlo), h), cmap="inferno", origin=origin, alpha=0.3,
                  vmin=hlo, vmax=hhi, interpolation="nearest")
        abnormal = abnormal_voxels(h, pixel_threshold)
        if np.isfinite(pixel_threshold) and abnormal.any():
            ax.imshow(np.ma.masked_where(~abnormal, h), cmap="inferno", origin=origin, alpha=0.8, vmin=hlo,
                      vmax=hhi, interpolation="nearest")
            ax.contour(abnormal, levels=[0.5], colors="cyan", linewidths=0.8, origin=origin)
        ax.set_title(f"slice {k}" + (" (peak)" if k == peak else ""), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=80)
    plt.close(fig)


def to_ras(array, affine):
    """The array in the closest RAS voxel order (for display: axis 2 = axial, like the model's slice axes)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, ornt)
