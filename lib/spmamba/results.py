"""The output folder of ``spmamba detect``, written and read here only (the contract is docs/CLI.md):

- ``DIR/<id>_anomaly.nii.gz``: the float32 heatmap on the input's grid (:func:`heatmap_path`);
- ``DIR/scores.csv``: columns ``id,score,threshold,abnormal`` (abnormal 0/1), one row per scored volume, written
  and flushed as it goes, each row after its heatmap;
- ``DIR/<id>_overlay.png``: the optional slice mosaic (:func:`overlay_path`);
- ``DIR/detect.json``: ``model``, ``version``, ``pixel_threshold``, ``n_inputs``, ``n_done``, ``n_failed``,
  ``failed`` (``path``, ``error``), ``seconds`` and, for a model that aligns its inputs, ``alignment``.

``spmamba detect`` writes it with :class:`DetectOutputWriter`; ``spmamba evaluate`` (``spmamba.metrics``) reads it
with :func:`read_scores`, :func:`read_detect_meta` and :func:`heatmap_path`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from spmamba.atomic import write_json
from spmamba.io import save_volume

__all__ = ["SCORES_CSV", "DETECT_JSON", "SCORE_COLUMNS", "ResultsError", "heatmap_path", "overlay_path",
           "DetectOutputWriter", "read_scores", "read_detect_meta", "parse_abnormal"]

SCORES_CSV = "scores.csv"
DETECT_JSON = "detect.json"
SCORE_COLUMNS = ("id", "score", "threshold", "abnormal")

PathLike = Union[str, Path]


class ResultsError(ValueError):
    """A detect output folder that cannot be read; the message names the file and the problem."""


def heatmap_path(folder: PathLike, sid: str) -> Path:
    return Path(folder) / f"{sid}_anomaly.nii.gz"


def overlay_path(folder: PathLike, sid: str) -> Path:
    return Path(folder) / f"{sid}_overlay.png"


class DetectOutputWriter:
    """Writes one detect output folder: ``add`` per scored volume (heatmap, then its scores.csv row, flushed),
    ``finish`` once (detect.json). Use it as a context manager so scores.csv is closed whatever happens."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.folder / SCORES_CSV, "w", newline="")
        self._rows = csv.writer(self._fh)
        self._rows.writerow(SCORE_COLUMNS)
        self._fh.flush()

    def add(self, sid: str, heatmap: np.ndarray, affine: np.ndarray, score: float, threshold: float,
            abnormal: bool) -> Path:
        """Write the heatmap, then its row; returns the heatmap's path."""
        path = save_volume(heatmap, affine, heatmap_path(self.folder, sid))
        self._rows.writerow([sid, f"{float(score):.6g}", f"{float(threshold):.6g}", int(bool(abnormal))])
        self._fh.flush()
        return path

    def finish(self, *, model: str, version: Optional[str], pixel_threshold: Optional[float], n_inputs: int,
               n_done: int, failed: Sequence[tuple[str, str]], seconds: float,
               alignment: Optional[dict] = None) -> Path:
        """Write detect.json (atomically); ``failed``: (path, error) of each input that was not scored."""
        meta: dict[str, Any] = {
            "model": model, "version": version, "pixel_threshold": pixel_threshold, "n_inputs": n_inputs,
            "n_done": n_done, "n_failed": len(failed), "failed": [{"path": p, "error": e} for p, e in failed],
            "seconds": round(seconds, 2)}
        if alignment is not None:
            meta["alignment"] = alignment
        return write_json(self.folder / DETECT_JSON, meta)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "DetectOutputWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_abnormal(value: Any) -> bool:
    """An abnormal flag as written in CSV files: 1/0, true/false, yes/no, abnormal/normal (any case)."""
    t = str(value).strip().lower()
    if t in ("1", "true", "yes", "abnormal", "1.0"):
        return True
    if t in ("0", "false", "no", "normal", "0.0"):
        return False
    raise ValueError(f"cannot read {value!r} as abnormal 0/1")


def read_scores(folder: PathLike) -> dict[str, dict]:
    """``scores.csv`` as ``{id: {"score": float, "threshold": float | None, "abnormal": bool | None}}`` in file
    order (``threshold`` and ``abnormal`` may be missing in files made by other tools)."""
    path = Path(folder) / SCORES_CSV
    if not path.exists():
        raise ResultsError(f"{path}: not found (run `spmamba detect ... --out {path.parent}` first)")
    rows: dict[str, dict] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"id", "score"} <= set(reader.fieldnames):
            raise ResultsError(f"{path}: needs columns id,score (found {reader.fieldnames})")
        for i, r in enumerate(reader, start=2):
            try:
                rows[r["id"]] = {
                    "score": float(r["score"]),
                    "threshold": float(r["threshold"]) if r.get("threshold") not in (None, "") else None,
                    "abnormal": parse_abnormal(r["abnormal"]) if r.get("abnormal") not in (None, "") else None}
            except ValueError as exc:
                raise ResultsError(f"{path}, line {i}: {exc}") from exc
    return rows


def read_detect_meta(folder: PathLike) -> dict:
    """``detect.json`` as a dict; ``{}`` when the folder has none (made by another tool)."""
    path = Path(folder) / DETECT_JSON
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ResultsError(f"{path}: not valid JSON ({exc})") from exc
