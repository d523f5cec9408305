"""The output folder of ``spmamba detect``, written and read here only (the contract is docs/CLI.md):

- ``DIR/<id>_anomaly.nii.gz``: the float32 heatmap on the input's grid (:func:`heatmap_path`);
- ``DIR/scores.csv``: columns ``id,score,threshold,abnormal`` (abnormal 0/1), one row per scored volume, written
  and flushed as it goes, each row after its heatmap;
- ``DIR/<id>_overlay.png``: the optional slice mosaic (:func:`overlay_path`);
- ``DIR/detect.json``: ``model``, ``version``, ``pixel_threshold``, ``n_inputs``, ``n_done``, ``n_failed``,
  ``failed`` (``path``, ``error``), ``seconds`` and, for a model that aligns its inputs, ``alignment``.

A sharded detection (``spmamba detect --shard K/N``: N processes or jobs, each a share of the inputs) writes the
heatmaps into the same folder and, per shard, instead of the last two:

- ``DIR/scores.shard-K-of-N.csv``: the shard's rows, columns ``id,score,threshold,abnormal,model_version``;
- ``DIR/detect.shard-K-of-N.json``: the shard's ``detect.json`` with ``shard`` ("K/N"), ``status`` (``running``,
  then ``done``) and ``n_skipped`` (inputs already done by an earlier run of the shard).

A shard is restartable: a row whose heatmap exists, written by the same model version, is not done again. When the
last shard is done, its process (or ``spmamba detect --merge DIR``) builds ``scores.csv`` (rows sorted by id) and
``detect.json`` (with ``shards``: N) from them (:func:`merge_shards`).

``spmamba detect`` writes it with :class:`DetectOutputWriter`; ``spmamba evaluate`` (``spmamba.metrics``) reads it
with :func:`read_scores`, :func:`read_detect_meta` and :func:`heatmap_path`.
"""
from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence, TypeVar, Union

import numpy as np

from spmamba.atomic import write_json, write_text
from spmamba.io import save_volume

__all__ = ["SCORES_CSV", "DETECT_JSON", "SCORE_COLUMNS", "ResultsError", "heatmap_path", "overlay_path",
           "DetectOutputWriter", "read_scores", "read_detect_meta", "parse_abnormal", "shard_scores_path",
           "shard_meta_path", "merge_shards", "shard_status", "Shard"]

SCORES_CSV = "scores.csv"
DETECT_JSON = "detect.json"
SCORE_COLUMNS = ("id", "score", "threshold", "abnormal")
SHARD_COLUMNS = SCORE_COLUMNS + ("model_version",)
_SHARD_META = re.compile(r"^detect\.shard-(\d+)-of-(\d+)\.json$")

PathLike = Union[str, Path]
T = TypeVar("T")


class ResultsError(ValueError):
    """A detect output folder that cannot be read; the message names the file and the problem."""


def heatmap_path(folder: PathLike, sid: str) -> Path:
    return Path(folder) / f"{sid}_anomaly.nii.gz"


def overlay_path(folder: PathLike, sid: str) -> Path:
    return Path(folder) / f"{sid}_overlay.png"


class Shard(NamedTuple):
    """Share ``index`` of ``count`` of a batch job (0 <= index < count): the items at positions index, index + count,
    ... of the job's list (a deterministic, balanced share)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """"K/N" -> Shard(K, N); ValueError with what to write otherwise."""
        try:
            k, n = (int(x) for x in str(text).strip().split("/"))
        except ValueError:
            raise ValueError(f"--shard {text!r}: write INDEX/COUNT, e.g. 0/4 (shards 0 to 3 of 4)") from None
        if n < 1 or not 0 <= k < n:
            raise ValueError(f"--shard {text!r}: need 0 <= INDEX < COUNT (shards 0 to {max(n, 1) - 1} of {n})")
        return cls(k, n)

    @classmethod
    def from_env(cls) -> Optional["Shard"]:
        """torchrun's ``RANK``/``WORLD_SIZE`` when it started this process with several ranks; else None."""
        from spmamba.distributed import launched

        rank, world = launched()
        return cls(rank, world) if world > 1 else None

    def take(self, items: Iterable[T]) -> list[T]:
        return [x for i, x in enumerate(items) if i % self.count == self.index]

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def shard_scores_path(folder: PathLike, shard: Shard) -> Path:
    return Path(folder) / f"scores.shard-{shard.index}-of-{shard.count}.csv"


def shard_meta_path(folder: PathLike, shard: Shard) -> Path:
    return Path(folder) / f"detect.shard-{shard.index}-of-{shard.count}.json"


def _shard_rows(path: Path) -> dict[str, list[str]]:
    """The complete rows of a shard's scores file (id -> row; the last row of an id wins). A line without its
    newline (the shard was killed while writing it) or with missing fields is dropped."""
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text().splitlines(keepends=True) if ln.endswith("\n")]
    rows: dict[str, list[str]] = {}
    for row in csv.reader(lines[1:]):
        if len(row) == len(SHARD_COLUMNS):
            rows[row[0]] = row
    return rows


class DetectOutputWriter:
    """Writes one detect output folder: ``add`` per scored volume (heatmap, then its scores.csv row, flushed),
    ``finish`` once (detect.json). Use it as a context manager so scores.csv is closed whatever happens.

    With ``shard`` (and the ``model_version`` detecting), the shard's own files instead (see the module docstring):
    rows of an earlier run of this shard by the same model version whose heatmaps exist are kept (``done`` says
    whether an id is among them) and the file goes on after them; ``finish`` builds ``scores.csv`` when every
    shard is done. A ResultsError when the folder holds shards of another count or another model version."""

    def __init__(self, folder: PathLike, shard: Optional[Shard] = None, model_version: Optional[str] = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard, self.model_version = shard, model_version
        self.previous: dict[str, list[str]] = {}
        if shard is None:
            self._fh = open(self.folder / SCORES_CSV, "w", newline="")
            self._rows = csv.writer(self._fh)
            self._rows.writerow(SCORE_COLUMNS)
            self._fh.flush()
            return
        others = sorted({int(m.group(2)) for m in map(_SHARD_META.match, _names(self.folder)) if m} - {shard.count})
        if others:
            raise ResultsError(f"{self.folder} holds the results of a detection in {others[0]} shards; give every "
                               f"shard the same --shard COUNT ({others[0]}), or another --out folder")
        path = shard_scores_path(self.folder, shard)
        for sid, row in _shard_rows(path).items():
            if row[4] != str(model_version):
                raise ResultsError(f"{path}: holds results of model version {row[4]}, not {model_version}; use "
                                   "another --out folder, or delete that file to start the shard over")
            if heatmap_path(self.folder, sid).exists():
                self.previous[sid] = row
        buf = io.StringIO()
        csv.writer(buf).writerows([SHARD_COLUMNS, *self.previous.values()])
        write_text(path, buf.getvalue())  # what survives of an earlier run, complete lines only
        self._fh = open(path, "a", newline="")
        self._rows = csv.writer(self._fh)
        write_json(shard_meta_path(self.folder, shard), {"shard": shard.label, "status": "running",
                                                         "version": model_version, "started": time.time()})

    def done(self, sid: str) -> bool:
        """Whether an earlier run of this shard scored ``sid`` (with this model version; its heatmap exists)."""
        return sid in self.previous

    def add(self, sid: str, heatmap: np.ndarray, affine: np.ndarray, score: float, threshold: float,
            abnormal: bool) -> Path:
        """Write the heatmap, then its row; returns the heatmap's path."""
        path = save_volume(heatmap, affine, heatmap_path(self.folder, sid))
        row = [sid, f"{float(score):.6g}", f"{float(threshold):.6g}", int(bool(abnormal))]
        self._rows.writerow(row if self.shard is None else row + [self.model_version])
        self._fh.flush()
        return path

    def finish(self, *, model: str, version: Optional[str], pixel_threshold: Optional[float], n_inputs: int,
               n_done: int, failed: Sequence[tuple[str, str]], seconds: float,
               alignment: Optional[dict] = None) -> Path:
        """Write detect.json (atomically); ``failed``: (path, error) of each input that was not scored. A shard:
        its ``detect.shard-K-of-N.json`` (``n_done`` counts the inputs an earlier run did, ``n_skipped`` says how
        many), then, when every shard is done, ``scores.csv`` and ``detect.json`` (:func:`merge_shards`); returns
        the path of the shard's file."""
        meta: dict[str, Any] = {
            "model": model, "version": version, "pixel_threshold": pixel_threshold, "n_inputs": n_inputs,
            "n_done": n_done, "n_failed": len(failed), "failed": [{"path": p, "error": e} for p, e in failed],
            "seconds": round(seconds, 2)}
        if alignment is not None:
            meta["alignment"] = alignment
        if self.shard is None:
            return write_json(self.folder / DETECT_JSON, meta)
        self._fh.flush()
        path = write_json(shard_meta_path(self.folder, self.shard),
                          {**meta, "shard": self.shard.label, "status": "done", "n_skipped": len(self.previous)})
        if not shard_status(self.folder, self.shard.count)["missing"]:  # the last shard to finish merges
            merge_shards(self.folder)
        return path

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "DetectOutputWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _names(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()] if folder.is_dir() else []


def shard_status(folder: PathLike, count: Optional[int] = None) -> dict:
    """The shards of a sharded detection in ``folder``: ``count`` (N; None: the one the folder holds),
    ``done`` (indices finished), ``missing`` (indices not finished: running, killed or not started). ResultsError
    when the folder holds none, or shards of several counts."""
    folder = Path(folder)
    found: dict[int, dict[int, dict]] = {}
    for name in _names(folder):
        m = _SHARD_META.match(name)
        if m:
            try:
                meta = json.loads((folder / name).read_text())
            except ValueError as exc:
                raise ResultsError(f"{folder / name}: not valid JSON ({exc})") from exc
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = meta
    if count is None:
        if not found:
            raise ResultsError(f"{folder}: no shard of a sharded detection (detect.shard-K-of-N.json) found")
        if len(found) > 1:
            raise ResultsError(f"{folder}: holds shards of detections in {sorted(found)} shards; keep one")
        count = next(iter(found))
    shards = found.get(count, {})
    done = sorted(k for k, meta in shards.items() if meta.get("status") == "done")
    return {"count": count, "done": done, "missing": [k for k in range(count) if k not in done], "meta": shards}


def merge_shards(folder: PathLike) -> Path:
    """Build ``scores.csv`` (rows of every shard, sorted by id) and ``detect.json`` (counts summed, ``failed``
    joined, ``seconds`` of the slowest shard, ``shards``: N) from the finished shards in ``folder``, atomically.
    ResultsError naming what is missing when a shard has not finished, or when shards disagree on the model."""
    folder = Path(folder)
    status = shard_status(folder)
    count = status["count"]
    if status["missing"]:
        missing = ", ".join(f"{k}/{count}" for k in status["missing"])
        raise ResultsError(f"{folder}: shard(s) {missing} not finished; run them (again) with the same inputs and "
                           f"--out (each skips what it has done), then merge")
    metas = [status["meta"][k] for k in range(count)]
    versions = {m.get("version") for m in metas}
    if len(versions) > 1:
        raise ResultsError(f"{folder}: the shards were detected by different models ({', '.join(map(str, versions))})")
    rows: dict[str, list[str]] = {}
    for k in range(count):
        for sid, row in _shard_rows(shard_scores_path(folder, Shard(k, count))).items():
            if sid in rows:
                raise ResultsError(f"{folder}: {sid} was scored by two shards; were they given the same inputs?")
            rows[sid] = row[:len(SCORE_COLUMNS)]
    buf = io.StringIO()
    csv.writer(buf).writerows([SCORE_COLUMNS, *(rows[sid] for sid in sorted(rows))])
    out = write_text(folder / SCORES_CSV, buf.getvalue())
    first = metas[0]
    volumes: dict = {}
    for m in metas:
        volumes.update((m.get("alignment") or {}).get("volumes") or {})
    meta: dict[str, Any] = {
        "model": first.get("model"), "version": first.get("version"), "pixel_threshold": first.get("pixel_threshold"),
        "n_inputs": sum(int(m.get("n_inputs", 0)) for m in metas), "n_done": len(rows),
        "n_failed": sum(int(m.get("n_failed", 0)) for m in metas),
        "failed": [f for m in metas for f in m.get("failed", [])],
        "seconds": max(float(m.get("seconds", 0.0)) for m in metas), "shards": count}
    if first.get("alignment") is not None:
        meta["alignment"] = {**first["alignment"], "volumes": volumes}
    write_json(folder / DETECT_JSON, meta)
    return out


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
