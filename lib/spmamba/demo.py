"""The demo's data and model bookkeeping (``spmamba demo``): its folder layout, its synthetic studies with a
curation.csv, and the provenance record that decides whether its model can be reused; plus ``describe_model``, the
one-line summary of a model file that ``spmamba serve`` and ``spmamba demo`` print."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from spmamba.atomic import write_json

__all__ = ["DEMO_MADE_BY", "PROVENANCE_SUFFIX", "demo_model_path", "provenance_path", "sha256_file", "files_digest",
           "demo_settings", "demo_model_status", "write_provenance", "prepare_demo", "describe_model"]

DEMO_MADE_BY = "spmamba demo"
PROVENANCE_SUFFIX = ".provenance.json"


def _eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def demo_model_path(demo_dir: str | os.PathLike = "demo") -> Path:
    """Where ``spmamba demo`` puts its model: ``DEMO/model/demo.pt``, with ``demo.pt.provenance.json`` beside it.
    (What the app publishes when the demo's user retrains goes to ``DEMO/model/app/``.)"""
    return Path(demo_dir) / "model" / "demo.pt"


def provenance_path(model: Path) -> Path:
    """The provenance record beside a demo model: ``MODEL.provenance.json``."""
    return model.with_name(model.name + PROVENANCE_SUFFIX)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_digest(files: Sequence[Path]) -> str:
    """A short digest of the names and contents of ``files`` (order does not matter)."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda q: q.name):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:16]


def demo_settings(*, config: Any, epochs: Any, train_minutes: Any, n_train: int, n_test: int, seed: int,
                  spacing: float) -> dict:
    """What decides the demo's model: data set and training settings (not the device, not the port)."""
    return {"config": config, "epochs": epochs, "train_minutes": train_minutes,
            "n_train": n_train, "n_test": n_test, "seed": seed, "spacing": spacing}


def demo_model_status(model: Path, settings: dict, data_digest: str) -> tuple[bool, str]:
    """(reusable, why): a model is reused only when ``spmamba demo`` made it (provenance record beside it, whose
    hash matches the file) with the same settings on the same training volumes."""
    prov_path = provenance_path(model)
    if not model.is_file():
        return False, "there is none yet"
    if not prov_path.is_file():
        return False, f"it has no {prov_path.name}, so `{DEMO_MADE_BY}` did not make it"
    try:
        prov = json.loads(prov_path.read_text())
    except (OSError, ValueError) as e:
        return False, f"its provenance record {prov_path.name} is unreadable ({e})"
    if prov.get("made_by") != DEMO_MADE_BY:
        return False, f"its provenance record says it was made by {prov.get('made_by')!r}"
    if prov.get("model_sha256") != sha256_file(model):
        return False, "the file changed after `spmamba demo` made it"
    if prov.get("stopped_early"):
        return False, "its training was stopped early (Ctrl-C)"
    old = prov.get("settings") or {}
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
    if changed:
        return False, "it was made with other settings (" + ", ".join(changed) + ")"
    if prov.get("data") != data_digest:
        return False, "the demo's training volumes changed since it was made"
    return True, f"made by `{DEMO_MADE_BY}` with these settings on these volumes ({prov.get('created', '?')})"


def write_provenance(model: Path, settings: dict, data_digest: str, summary: dict, library_version: str) -> Path:
    """Record, beside a model the demo just trained, what made it (``demo_model_status`` reads it back).
    ``summary``: what training reported (version, seconds, stopped_early)."""
    return write_json(provenance_path(model), {
        "made_by": DEMO_MADE_BY, "settings": settings, "data": data_digest, "model_sha256": sha256_file(model),
        "version": summary.get("version"), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": summary.get("seconds"), "stopped_early": bool(summary.get("stopped_early")),
        "spmamba": library_version})


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def prepare_demo(demo_dir: str | os.PathLike, *, n_train: int = 20, n_test: int = 12, seed: int = 0,
                 spacing: float = 2.0, quiet: bool = False,
                 log: Optional[Callable[[str], None]] = None) -> Path:
    """Make ``demo_dir`` (synth data, skipped if present) and ``demo_dir/studies`` (all volumes, with a
    curation.csv marking the training normals as normal); return the studies folder. ``log``: where the one-line
    reports go (default stderr)."""
    from spmamba.data.synthetic import make_dataset
    from spmamba.io import volume_id

    say = log or _eprint
    d = Path(demo_dir)
    labels = d / "test" / "labels.csv"
    if labels.exists() and any((d / "train").glob("*.nii.gz")):
        say(f"[demo] using existing demo data in {d}")
    else:
        say(f"[demo] making demo studies in {d} ({n_train} normal + {n_test} test volumes)")
        make_dataset(d, n_train=n_train, n_test=n_test, seed=seed, spacing=spacing, progress=not quiet)
    studies = d / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    states = []
    for p in sorted((d / "train").glob("*.nii.gz")):
        _link_or_copy(p, studies / p.name)
        states.append((volume_id(p), "normal"))
    for p in sorted((d / "test" / "images").glob("*.nii.gz")):
        _link_or_copy(p, studies / p.name)
    cur = studies / "curation.csv"
    if not cur.exists():
        from spmamba import server

        server.write_curation_csv(cur, states)
    return studies


def minutes(seconds) -> str:
    """Seconds as "N s" (under 2 minutes) or "N.N min"; "?" when not a number."""
    if not isinstance(seconds, (int, float)):
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def describe_model(path: str | os.PathLike) -> str:
    """One line on a model file: version, preset, how long and how it was trained, by what, on what, when."""
    from spmamba.checkpoint import read_checkpoint_meta

    m = read_checkpoint_meta(path)
    cfg = m.get("config") or {}
    meta = m.get("meta") or {}
    tr = meta.get("training") or {}
    parts = [f"version {m.get('version') or '?'}", f"preset {cfg.get('name', '?')}"]
    if m.get("method", "spmamba") != "spmamba":
        parts.insert(1, f"method {m['method']}")
    steps, per_epoch, total_epochs = tr.get("steps"), tr.get("steps_per_epoch"), tr.get("total_epochs")
    if isinstance(steps, int):
        text = f"{steps} optimisation step{'' if steps == 1 else 's'}" + (
            f" ({steps / per_epoch:.3g} of {total_epochs} epochs)" if per_epoch else "")
    elif tr.get("epochs") is not None:
        text = f"{tr['epochs']} of {total_epochs} epochs"
    else:
        text = "training not recorded"
    reason = tr.get("stop_reason")
    if reason is None and tr.get("stopped_early"):
        reason = "stopped"
    how_it_ended = {"time_limit": f"stopped at its time limit of {minutes(tr.get('time_limit_s'))}",
                    "stopped": "stopped early", "max_steps": "capped by --max-steps"}.get(reason)
    if how_it_ended is None and tr:
        how_it_ended = "full schedule"
    parts.append(text + (f", {how_it_ended}" if how_it_ended else ""))
    how = f"made by `{tr['origin']}`" if tr.get("origin") else "made by the app or an earlier spmamba (not recorded)"
    if tr.get("train_seconds") is not None:
        how += f" in {minutes(tr['train_seconds'])} on {tr.get('device', '?')}"
    if tr.get("n_train_volumes") is not None:
        how += f" from {tr['n_train_volumes']} normal volumes"
        n_cal, n_held = tr.get("n_calibration_volumes"), tr.get("n_held_out_volumes")
        if n_cal is not None:
            how += (f" (calibrated on {n_cal} of {n_held} held-out volumes)" if n_held and n_held != n_cal
                    else f" (calibrated on {n_cal} held-out volume{'' if n_cal == 1 else 's'})")
    parts.append(how)
    teacher = meta.get("teacher")  # absent in files written before teachers were recorded
    if isinstance(teacher, dict) and teacher.get("source") in ("in-domain", "file") and teacher.get("objective"):
        steps = teacher.get("steps", "?")
        parts.append(f"teacher pretrained in domain ({teacher['objective']}, {steps} step{'' if steps == 1 else 's'}"
                     + (f", from {Path(str(teacher.get('file'))).name}" if teacher["source"] == "file" else "") + ")")
    if meta.get("created"):
        parts.append(f"created {meta['created']}")
    return ", ".join(parts)
