"""The ``spmamba`` command: synth, pretrain, train, detect, evaluate, serve, demo, login, logout.

The contract (docs/CLI.md, docs/ARCHITECTURE.md "CLI") is stable: scripts and checks drive it. Everything scientific is
in the library; this module parses arguments, streams files, draws progress bars on stderr and turns the library's
errors into one clear line on stderr and exit code 2 (0 = success, 2 = bad input / usage, 130 = interrupted).
``serve`` and ``demo`` end with Ctrl-C (or SIGTERM / SIGHUP) by design: the server and its children are stopped
quietly, one line says so, and the exit code is 0.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from spmamba.atomic import json_default, write_json
from spmamba.scoring import FUSIONS, INTENSITY_SEARCH_MM

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 2, 130


class CLIError(Exception):
    """A problem with the user's input; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _supported() -> str:
    from spmamba.io import SUPPORTED_FILES

    return SUPPORTED_FILES


def _is_image(p: Path) -> bool:
    from spmamba.io import is_volume_file

    return is_volume_file(p) and not p.name.startswith(".")


def _list_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """(volumes, other files) directly inside ``folder``, sorted: a volume is an image file or a subfolder holding
    a DICOM series (``spmamba.io.is_dicom_folder``); hidden entries are skipped."""
    from spmamba.io import is_dicom_folder

    images, others = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if (p.is_file() and _is_image(p)) or (p.is_dir() and is_dicom_folder(p)):
            images.append(p)
        elif p.is_file() and not p.name.lower().endswith((".raw", ".raw.gz")):  # .raw = data of a .nhdr
            others.append(p)
    return images, others


def iter_inputs(inputs: Sequence[str]) -> Iterator[Path]:
    """Yield volumes from files and folders, lazily: a folder that holds a DICOM series is one volume; another
    folder gives its direct image files and DICOM series subfolders, sorted."""
    from spmamba.io import is_dicom_file, is_dicom_folder

    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            if is_dicom_folder(p):
                yield p
                continue
            found = False
            for q in sorted(p.iterdir()):
                if not q.name.startswith(".") and ((q.is_file() and _is_image(q)) or (q.is_dir() and is_dicom_folder(q))):
                    found = True
                    yield q
            if not found:
                raise CLIError(f"{p}: folder has no {_supported()} files and no DICOM series")
        elif p.is_file():
            if not (_is_image(p) or is_dicom_file(p)):  # a single DICOM file: load_volume says if it is one slice
                raise CLIError(f"{p}: not a {_supported()} file or a DICOM series folder")
            yield p
        else:
            raise CLIError(f"{p}: no such file or folder")


def _check_inputs(inputs: Sequence[str]) -> int:
    """Check every input exists and ids are unique, without reading any volume; return the file count."""
    from spmamba.io import volume_id

    seen: dict[str, Path] = {}
    n = 0
    for p in iter_inputs(inputs):
        sid = volume_id(p)
        if sid in seen and seen[sid].resolve() != p.resolve():
            raise CLIError(f"{p}: same id {sid!r} as {seen[sid]}; outputs would overwrite each other (rename one)")
        seen[sid] = p
        n += 1
    return n


def _tqdm(**kw):
    from tqdm.auto import tqdm

    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(**kw)


# ----------------------------------------------------------------------------------------------------------------
# synth
# ----------------------------------------------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    from spmamba.data.synthetic import LESION_FAMILIES, make_dataset

    families = tuple(f.strip() for f in args.families.split(",") if f.strip()) if args.families else LESION_FAMILIES
    bad = [f for f in families if f not in LESION_FAMILIES]
    if bad:
        raise CLIError(f"--families: unknown {', '.join(bad)} (choose from {', '.join(LESION_FAMILIES)})")
    if args.n_train < 0 or args.n_test < 0:
        raise CLIError("--n-train and --n-test must be >= 0")
    if not 0.5 <= args.spacing <= 8.0:
        raise CLIError(f"--spacing {args.spacing}: must be between 0.5 and 8 mm")
    t0 = time.time()
    if not args.quiet:
        _eprint(f"[synth] {args.n_train} normal training + {args.n_test} test volumes at {args.spacing:g} mm "
                f"(seed {args.seed}) -> {args.out}")
    summary = make_dataset(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed, spacing=args.spacing,
                           progress=not args.quiet, abnormal_fraction=args.abnormal_fraction, families=families,
                           unregistered=args.unregistered)
    dt = time.time() - t0
    n = args.n_train + args.n_test
    summary["seconds"] = round(dt, 2)
    if args.unregistered:
        rng = summary.get("shape_range")
        grid = (f"unregistered, each on its own grid (shapes {tuple(int(x) for x in rng[0])} to "
                f"{tuple(int(x) for x in rng[1])}; poses in {args.out}/poses.json)") if rng else "unregistered"
    else:
        grid = f"shape {tuple(summary['shape'])}"
    print(f"wrote {n} volumes ({summary['n_abnormal']} abnormal test cases), {grid}, "
          f"{args.spacing:g} mm, to {args.out} in {dt:.1f} s")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------------
class _StopFlag:
    """SIGINT handler: the first Ctrl-C asks training to stop (a valid checkpoint is still written); the second
    aborts at once. Under torchrun (which forwards Ctrl-C, and a scheduler's SIGTERM, to every process it started)
    SIGTERM asks for the same graceful stop."""

    def __init__(self, time_limit_s: float | None = None, tag: str = "train") -> None:
        from spmamba.distributed import launched

        self.tag = tag
        self.requested = False
        self.timed_out = False
        self._old: dict = {}
        self._deadline = time.time() + time_limit_s if time_limit_s else None
        self._signals = [signal.SIGINT] + ([signal.SIGTERM] if launched()[1] > 1 else [])
        self._loud = launched()[0] == 0

    def __call__(self) -> bool:
        if not self.requested and self._deadline is not None and time.time() > self._deadline:
            self.timed_out = self.requested = True
            _eprint("\n[train] time limit reached; stopping after this step, then calibrating and saving")
        return self.requested

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self._loud:
            _eprint(f"\n[{self.tag}] stopping after the current step; the model will be " +
                    ("calibrated and saved" if self.tag == "train" else "saved") +
                    " (press Ctrl-C again to abort without saving)")

    def __enter__(self) -> "_StopFlag":
        for sig in self._signals:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _TrainProgress:
    """Turns the library's progress dicts into tqdm bars on stderr, one per phase: reading and slicing the volumes,
    timing one detection (with a time limit), encoder-norm adaptation (per batch), training (all optimisation steps
    of the run, with epoch and loss), position statistics and calibration (per volume).

    A phase's bar opens when the library announces the phase (step 0), and advances with ``update()``, so tqdm's
    rate is measured over real work (no rate from a bar opened just after its first step)."""

    LABELS = {"load": "reading", "prepare": "slicing", "measure": "timing a detection", "encoder_norm": "encoder norm",
              "train": "train", "position_stats": "position stats", "calibrate": "calibrate",
              "reference": "alignment reference", "align": "aligning", "fit": "fitting",
              "teacher_features": "teacher features", "pretrain": "teacher pretraining"}
    UNITS = {"train": "step", "encoder_norm": "batch", "teacher_features": "batch", "pretrain": "step"}

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.phase = None
        self.last: dict = {}

    def _open(self, phase: str, total, unit: str, initial: int = 0) -> None:
        self.close()
        self.phase = phase
        self.bar = _tqdm(total=total, initial=initial, desc=self.LABELS.get(phase, phase), unit=unit, leave=False,
                         smoothing=0.1)

    def _advance(self, done: int, total) -> None:
        if total is not None and self.bar.total != total:
            self.bar.total = total
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def __call__(self, info: dict) -> None:
        self.last = dict(info)
        if self.quiet:
            return
        phase = info.get("phase", "train")
        if phase == "done":
            self.close()
            return
        if phase == "epoch":  # end of an epoch: show its mean loss on the training bar
            if self.bar is not None and self.phase == "train" and isinstance(info.get("loss"), (int, float)):
                self.bar.set_postfix_str(f"epoch {info.get('epoch')}/{info.get('total_epochs')} "
                                         f"mean loss {info['loss']:.4g}")
            return
        if phase == "stage":  # a multi-stage method moves to its next stage
            if self.bar is not None:
                self.bar.write(f"training stage {info.get('stage')} from epoch {info.get('epoch')}")
            return
        if phase == "train":
            steps, epochs = int(info.get("total_steps") or 1), int(info.get("total_epochs") or 1)
            total = int(info.get("total_global_steps") or steps * epochs)
            done = info.get("global_step")
            if done is None:
                done = (int(info.get("epoch", 1)) - 1) * steps + int(info.get("step", 0))
            if self.phase != "train" or self.bar is None:
                self._open("train", total, "step", initial=int(done))
            self._advance(int(done), total)
            loss = info.get("loss")
            self.bar.set_postfix_str(f"epoch {info.get('epoch')}/{epochs}"
                                     + (f" loss {loss:.4g}" if isinstance(loss, (int, float)) else ""))
            return
        step = int(info.get("step") or 0)
        if phase != self.phase or self.bar is None:
            self._open(phase, info.get("total_steps"), info.get("unit") or self.UNITS.get(phase, "vol"), step)
        self._advance(step, info.get("total_steps"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.phase = None


def _training_files(folder: str) -> list[Path]:
    d = Path(folder)
    if not d.exists():
        raise CLIError(f"{d}: no such folder (--normal needs a folder of normal volumes)")
    if not d.is_dir():
        raise CLIError(f"{d}: not a folder (--normal needs a folder of normal volumes)")
    from spmamba.io import is_dicom_folder

    if is_dicom_folder(d):
        raise CLIError(f"{d}: holds a single DICOM series (one volume); --normal needs a folder of normal volumes: "
                       "put each DICOM series in its own subfolder of DIR")
    images, others = _list_folder(d)
    from spmamba.distributed import is_main_process

    if others and is_main_process():  # under torchrun: said once
        names = ", ".join(p.name for p in others[:5]) + (" ..." if len(others) > 5 else "")
        _eprint(f"[train] ignoring {len(others)} file(s) that are not {_supported()} in {d}: {names}")
    if not images:
        raise CLIError(f"{d}: no {_supported()} volumes or images and no DICOM series folders found")
    return images


def train_model(normal_dir: str, out: str, *, config: str | None = None, method: str | None = None,
                epochs: int | None = None, device: str = "auto", resume: str | None = None,
                encoder_weights: str = "none", val_fraction: float = 0.2, seed: int = 0,
                max_steps: int | None = None, time_limit_min: float | None = None, quiet: bool = False,
                position_normalise: bool | None = None, origin: str = "spmamba train", align: str | None = None,
                align_reference: str = "auto", teacher_pretrain: str = "none",
                pretrain_steps: int | None = None, fusion: str | None = None,
                batch_size: int | None = None, settings: dict | None = None,
                intensity_search_mm: float | None = None) -> dict:
    """What ``spmamba train`` does (also used by ``spmamba demo``); returns a summary dict.

    ``method``: a method of the registry (default spmamba, or the resumed model's); ``config``: one of its presets
    (default: the method's default preset). ``teacher_pretrain`` / ``pretrain_steps``: in-domain pretraining of
    the teacher before distillation (``train_detector``). ``fusion``: None or "auto" = the product's default
    (``train_detector(fusion=None)``), else "none" or one of ``scoring.FUSIONS``; ``intensity_search_mm``: the fused
    |z| map's search distance (None: the product's default). ``batch_size``: samples per step
    of each process, instead of the preset's (the learning rate follows it, ``TrainingSettings.lr``). ``settings``:
    the preset's settings changed by name (``--set``, checked by :func:`config_with_settings`).

    ``time_limit_min`` bounds the whole training in wall time, from reading the volumes to the calibrated model
    (``train_detector(time_limit=...)``); ``origin`` is recorded in the model (``meta.training.origin``).
    ``align``: None = the product's default (``registration.DEFAULT_ALIGN``, "auto"; a resumed model keeps its
    own setting)."""
    from spmamba.distributed import launched
    from spmamba.registration import DEFAULT_ALIGN

    align = DEFAULT_ALIGN if align is None else align
    rank, processes = launched()  # torchrun: every process runs this; rank 0 reports and writes the files
    quiet = quiet or rank != 0
    files = _training_files(normal_dir)
    out_path = Path(out)
    if out_path.exists() and out_path.is_dir():
        raise CLIError(f"{out_path}: is a folder; --out needs a file name such as model.pt")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if resume and not Path(resume).is_file():
        raise CLIError(f"{resume}: --resume checkpoint not found")
    method, config = _method_and_preset(method, config, resume)
    model_config = config
    if batch_size is not None or settings:  # the preset changed (a new model: checked by cmd_train)
        model_config = config_with_settings(method, config, settings, batch_size=batch_size)
    if not quiet:
        _eprint(f"[train] {len(files)} normal volumes from {normal_dir}, "
                + (f"method {method}, " if method != "spmamba" else "") + f"preset {config!r}"
                + (f", {epochs} epochs" if epochs else "")
                + (f", batch {batch_size}" if batch_size else "")
                + "".join(f", {k}={v!r}" for k, v in (settings or {}).items())
                + (f", at most {time_limit_min:g} min of wall time" if time_limit_min else "")
                + (f", teacher pretrained ({teacher_pretrain})" if teacher_pretrain not in (None, "none") else "")
                + f", device {device}"
                + (f", {processes} processes (torchrun; each step's batch is {processes} x the preset's)"
                   if processes > 1 else "")
                + "; Ctrl-C stops early and still saves")
    from spmamba.train import train_detector

    progress = _TrainProgress(quiet)
    t0 = time.time()
    # Per-epoch checkpoints (with the optimiser state, for --resume) go to MODEL.pt.partial; MODEL.pt itself is
    # only ever replaced by a finished, calibrated model.
    partial = out_path.with_name(out_path.name + ".partial")
    with _StopFlag() as stop:
        try:
            detector = train_detector(files, method=method, config=model_config, epochs=epochs, device=device,
                                      val_fraction=val_fraction, seed=seed, encoder_weights=encoder_weights, progress=progress,
                                      should_stop=stop, resume=resume, checkpoint_path=str(partial),
                                      position_normalise=position_normalise, origin=origin,
                                      align=align, align_reference=align_reference,
                                      time_limit=time_limit_min * 60 if time_limit_min else None,
                                      teacher_pretrain=teacher_pretrain, pretrain_steps=pretrain_steps,
                                      fusion=None if fusion in (None, "auto") else fusion,
                                      intensity_search_mm=intensity_search_mm,
                                      stop_time_limit=_torchrun_stop_seconds() if processes > 1 else None,
                                      **({"max_steps": max_steps} if max_steps else {}))
        except KeyboardInterrupt:
            progress.close()
            if partial.exists() and rank == 0:
                _eprint(f"[train] aborted; the last finished epoch is in {partial} (continue with --resume {partial})")
            raise
        finally:
            progress.close()
        if rank == 0 and partial.exists():  # under torchrun rank 0 alone wrote it
            os.replace(partial, out_path)
        elif rank == 0:  # pragma: no cover - the library always writes checkpoint_path; keep the CLI safe
            detector.save(str(out_path))
    dt = time.time() - t0
    meta = getattr(detector, "meta", {}) or {}
    reason = (meta.get("training") or {}).get("stop_reason") if isinstance(meta, dict) else None
    summary = {"model": str(out_path), "version": getattr(detector, "version", None), "n_volumes": len(files),
               "seconds": round(dt, 1), "stopped_early": reason == "stopped",
               "timed_out": reason == "time_limit", "rank": rank, "processes": processes}
    if isinstance(meta, dict) and meta.get("training"):
        summary["training"] = meta["training"]
    return summary


def _torchrun_stop_seconds() -> float:
    """Under torchrun a Ctrl-C (or SIGTERM) reaches the training processes from torchrun, which kills them after its
    shutdown timeout (``--shutdown-timeout`` / ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s by default): the time a
    stopped training has to calibrate and save, less a margin."""
    try:
        grace = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
    except ValueError:
        grace = 30.0
    return max(5.0, grace - 8.0)


def _method_and_preset(method: str | None, config: str | None, resume: str | None) -> tuple[str | None, str | None]:
    """Check ``--method`` and ``--config`` against the registry (``spmamba.methods``): a known method, one of its
    presets; defaults: spmamba (or the resumed model's method) and that method's default preset."""
    from spmamba.methods import DEFAULT_METHOD, get_method, method_names

    if resume:  # the resumed model decides; its preset is kept
        return method, config
    name = method or DEFAULT_METHOD
    if name not in method_names():
        raise CLIError(f"--method {name}: unknown method; choose one of {', '.join(method_names())}")
    cls = get_method(name)
    preset = config or cls.default_preset
    if preset not in cls.PRESETS:
        raise CLIError(f"--config {preset}: not a preset of method {name}; choose one of {', '.join(cls.PRESETS)}")
    return name, preset


def parse_settings(pairs: Sequence[str] | None) -> dict:
    """``--set KEY=VALUE`` (repeated) -> {key: value}. Values are read as Python literals (``0``, ``2e-4``,
    ``(1, 2)``), ``true``/``false`` as booleans, anything else as text; :func:`config_with_settings` checks them."""
    import ast

    out: dict = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise CLIError(f"--set {pair}: give KEY=VALUE, e.g. --set memory_slots=0")
        if key in out:
            raise CLIError(f"--set {key}: given twice")
        if text.lower() in ("true", "false"):
            out[key] = text.lower() == "true"
            continue
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def config_with_settings(method: str, preset: str, settings: dict | None, batch_size: int | None = None):
    """The ``preset`` of ``method`` with ``settings`` (architecture or training settings, by name) and
    ``batch_size`` changed, validated. Unknown names, values of the wrong type and values the method refuses give a
    :class:`CLIError` that names the setting and what is allowed."""
    from dataclasses import fields, is_dataclass

    from spmamba.methods import get_method
    from spmamba.methods.base import TrainingSettings

    cls = get_method(method)
    base = cls.get_config(preset)
    defaults = {f.name: getattr(base, f.name) for f in fields(base)} if is_dataclass(base) else {}
    defaults.pop("name", None)
    training = defaults.pop("training", None)
    if training is not None:
        defaults.update({k: getattr(training, k) for k in TrainingSettings.names()})
    overrides = {}
    for key, value in (settings or {}).items():
        if key not in defaults:
            raise CLIError(f"--set {key}: not a setting of method {method}; its settings are "
                           f"{', '.join(sorted(defaults)) or 'none'}")
        overrides[key] = _setting_value(key, value, defaults[key])
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    try:
        return cls.get_config(preset, **overrides)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--set: {e}") from None


def _setting_value(key: str, value, default):
    """``value`` in the type of the preset's ``default`` (an int where an int is, a tuple for a tuple ...)."""
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          tuple: lambda v: isinstance(v, (tuple, list)),
          list: lambda v: isinstance(v, (tuple, list))}
    kind = next((t for t in ok if isinstance(default, t)), None)  # bool before int: True is an int too
    if default is None or kind is None:
        return value
    if not ok[kind](value):
        raise CLIError(f"--set {key}={value!r}: {key} must be of type {kind.__name__}, like the preset's "
                       f"{default!r}")
    return float(value) if kind is float else tuple(value) if kind is tuple else list(value) if kind is list \
        else value


def _check_teacher_options(objective: str, steps: int | None, method: str | None, resume: str | None,
                           encoder_weights: str) -> None:
    """--teacher-pretrain / --pretrain-steps / --encoder-weights FILE: one clear line for what cannot work."""
    from spmamba.methods import DEFAULT_METHOD, get_method, method_names

    if encoder_weights not in ("none", "random", "imagenet", "") and not Path(encoder_weights).expanduser().is_file():
        raise CLIError(f"--encoder-weights {encoder_weights}: no such file (give none, imagenet, a torchvision "
                       "ResNet .pth or a teacher file written by `spmamba pretrain`)")
    if objective in (None, "none"):
        if steps is not None:
            raise CLIError("--pretrain-steps needs --teacher-pretrain inpaint|denoise")
        return
    if resume:
        raise CLIError("--teacher-pretrain: a resumed model keeps its teacher; drop --resume or --teacher-pretrain")
    name = method or DEFAULT_METHOD
    allowed = tuple(get_method(name).PRETRAIN_OBJECTIVES) if name in method_names() else ()
    if name in method_names() and not allowed:
        raise CLIError(f"--teacher-pretrain {objective}: method {name} has no teacher to pretrain")
    if allowed and objective not in allowed:
        raise CLIError(f"--teacher-pretrain {objective}: unknown objective; choose none, {', '.join(allowed)}")
    if steps is not None and steps < 1:
        raise CLIError(f"--pretrain-steps {steps}: must be >= 1")


def _check_training_limits(args: argparse.Namespace) -> None:
    """The options `train` and `pretrain` share: --time-limit > 0 minutes, 0 < --val-fraction < 1."""
    if args.time_limit is not None and args.time_limit <= 0:
        raise CLIError(f"--time-limit {args.time_limit}: must be > 0 minutes")
    if not 0.0 < args.val_fraction < 1.0:
        raise CLIError(f"--val-fraction {args.val_fraction}: must be between 0 and 1")


def cmd_train(args: argparse.Namespace) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise CLIError(f"--epochs {args.epochs}: must be >= 1")
    if args.epochs is not None and not args.resume:
        from spmamba.methods import DEFAULT_METHOD, get_method, method_names, min_epochs

        name = args.method or DEFAULT_METHOD
        if name in method_names() and args.epochs < min_epochs(name):
            stages = get_method(name).TRAINING_STAGES
            raise CLIError(f"--epochs {args.epochs}: method {name} trains in {len(stages)} stages "
                           f"({', '.join(stages)}), one epoch at least each: epochs must be >= {len(stages)}")
    _check_training_limits(args)
    if args.max_steps is not None and args.max_steps < 1:
        raise CLIError(f"--max-steps {args.max_steps}: must be >= 1")
    if args.batch_size is not None:
        from spmamba.methods import DEFAULT_METHOD, get_method, method_names

        if args.batch_size < 1:
            raise CLIError(f"--batch-size {args.batch_size}: must be >= 1")
        if args.resume:
            raise CLIError("--batch-size: a resumed model keeps its batch size; drop one of them")
        name = args.method or DEFAULT_METHOD
        preset = get_method(name).PRESETS.get(args.config or get_method(name).default_preset) \
            if name in method_names() else None
        if preset is not None and getattr(preset, "training", None) is None:
            raise CLIError(f"--batch-size: method {name} is fitted in one pass, not in batches")
    ref = args.align_reference
    if ref not in ("auto", "normals", "mni152") and not ref.startswith("mni152:") and not Path(ref).is_file():
        raise CLIError(f"--align-reference {ref}: not 'auto', 'normals', 'mni152' or an existing volume file")
    if ref != "auto" and args.align not in ("affine", "deformable"):
        raise CLIError("--align-reference needs --align affine or --align deformable")
    _check_teacher_options(args.teacher_pretrain, args.pretrain_steps, args.method, args.resume, args.encoder_weights)
    settings = parse_settings(args.settings)
    if settings and args.resume:
        raise CLIError("--set: a resumed model keeps its settings; drop --resume or --set")
    if settings:  # checked before any volume is read
        method, preset = _method_and_preset(args.method, args.config, None)
        config_with_settings(method, preset, settings, batch_size=args.batch_size)
    if args.fusion not in ("auto", "none") and (args.position_normalise is False or args.align == "none"):
        raise CLIError(f"--fusion {args.fusion} compares intensities by position: it needs aligned volumes and "
                       "position-aware normalisation (drop --align none / --no-position-normalise, or use --fusion none)")
    if args.intensity_search is not None and args.intensity_search < 0:
        raise CLIError(f"--intensity-search {args.intensity_search:g}: a distance in mm, 0 or more (0 = no search)")
    if args.intensity_search is not None and args.fusion == "none":
        raise CLIError("--intensity-search applies to the fused intensity map: drop it or --fusion none")
    s = train_model(args.normal, args.out, config=args.config, method=args.method, epochs=args.epochs,
                    device=args.device, resume=args.resume, encoder_weights=args.encoder_weights,
                    val_fraction=args.val_fraction, seed=args.seed, max_steps=args.max_steps,
                    time_limit_min=args.time_limit, quiet=args.quiet, position_normalise=args.position_normalise,
                    align=args.align, align_reference=ref, teacher_pretrain=args.teacher_pretrain,
                    pretrain_steps=args.pretrain_steps, fusion=args.fusion, batch_size=args.batch_size,
                    settings=settings, intensity_search_mm=args.intensity_search)
    if s.get("rank", 0) != 0:  # another process of a torchrun training: rank 0 reports
        return EXIT_OK
    al = (s.get("training") or {}).get("alignment")
    note = ((f"; aligned to the {al['reference']} reference ({al['method']})" if al else "; not aligned")
            if s.get("training") else "")
    note += " (stopped early by Ctrl-C; calibrated)" if s["stopped_early"] else ""
    note += " (time limit reached; calibrated)" if s["timed_out"] else ""
    note += f" by {s['processes']} processes" if s["processes"] > 1 else ""
    print(f"saved {s['model']} (version {s['version']}) trained on {s['n_volumes']} volumes in "
          f"{s['seconds']:.1f} s{note}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# pretrain
# ----------------------------------------------------------------------------------------------------------------
def cmd_pretrain(args: argparse.Namespace) -> int:
    from spmamba.distributed import launched

    if launched()[1] > 1:
        raise CLIError("pretrain runs in one process; start it without torchrun (train's --teacher-pretrain under "
                       "torchrun pretrains once, on rank 0)")
    _check_training_limits(args)
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps {args.steps}: must be >= 1")
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"{out}: is a folder; --out needs a file name such as teacher.pt")
    method, config = _method_and_preset(None, args.config, None)
    if args.objective == "none":
        raise CLIError("--objective none: choose inpaint or denoise")
    try:
        _check_teacher_options(args.objective, args.steps, method, None, args.encoder_weights)
    except CLIError as e:
        raise CLIError(str(e).replace("--teacher-pretrain", "--objective").replace("--pretrain-steps", "--steps"))
    files = _training_files(args.normal)
    from spmamba.pretrain import pretrain_teacher

    if not args.quiet:
        _eprint(f"[pretrain] {len(files)} normal volumes from {args.normal}, preset {config!r}, objective "
                f"{args.objective}, " + (f"at most {args.time_limit:g} min" if args.time_limit else
                                         f"{args.steps or 'default'} steps")
                + "; Ctrl-C stops early and still saves")
    progress = _TrainProgress(args.quiet)
    with _StopFlag(tag="pretrain") as stop:
        try:
            rec = pretrain_teacher(files, out, objective=args.objective, config=config, steps=args.steps,
                                   time_limit=args.time_limit * 60 if args.time_limit else None,
                                   encoder_weights=args.encoder_weights, val_fraction=args.val_fraction,
                                   seed=args.seed, device=args.device, progress=progress, should_stop=stop)
        finally:
            progress.close()
    if not rec.get("written"):
        _eprint(f"spmamba pretrain: stopped before the first step; nothing learnt, {out} not written")
        return EXIT_INTERRUPTED
    why = {"stopped": " (stopped early by Ctrl-C)", "time_limit": " (time limit reached)"}.get(rec["stop_reason"], "")
    print(f"saved teacher {out} ({rec['objective']}, {rec['steps']} steps, {rec['slices_seen']} slices, "
          f"{rec['seconds']:.1f} s){why}; use it with: spmamba train --encoder-weights {out} ...")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# detect
# ----------------------------------------------------------------------------------------------------------------
def cmd_merge(folder: str) -> int:
    """``spmamba detect --merge DIR``: scores.csv and detect.json from the finished shards in DIR."""
    from spmamba.results import ResultsError, merge_shards, read_detect_meta

    if not Path(folder).is_dir():
        raise CLIError(f"{folder}: no such folder (give the --out folder of the shards)")
    try:
        path = merge_shards(folder)
    except ResultsError as e:
        raise CLIError(str(e)) from e
    meta = read_detect_meta(folder)
    print(f"{path}: {meta['n_done']} volume(s) scored by {meta['shards']} shards"
          + (f"; {meta['n_failed']} input(s) could not be read or aligned" if meta["n_failed"] else ""))
    return EXIT_OK


def cmd_detect(args: argparse.Namespace) -> int:
    from spmamba.results import Shard

    if args.merge is not None:
        if args.inputs or args.model or args.out or args.shard:
            raise CLIError("--merge DIR takes no inputs, --model, --out or --shard (it merges the shards in DIR)")
        return cmd_merge(args.merge)
    if not args.inputs or not args.model or not args.out:
        raise CLIError("give --model MODEL.pt, one or more inputs and --out DIR (or --merge DIR)")
    try:  # a share of the inputs: --shard K/N, or torchrun's RANK/WORLD_SIZE
        shard = Shard.parse(args.shard) if args.shard else Shard.from_env()
    except ValueError as e:
        raise CLIError(str(e)) from e
    _check_inputs(args.inputs)
    model = Path(args.model)
    if not model.is_file():
        raise CLIError(f"{model}: model file not found (make one with `spmamba train`)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out}: exists and is not a folder")
    from spmamba.detector import Detector, resolve_device
    from spmamba.distributed import local_device
    from spmamba.figures import save_mosaic, to_ras
    from spmamba.results import DetectOutputWriter, ResultsError, overlay_path
    from spmamba.io import VolumeError, load_volume, volume_id

    inputs = list(iter_inputs(args.inputs))
    if shard is not None:  # the shard's share of all inputs, in the order of their ids
        inputs = shard.take(sorted(inputs, key=volume_id))
    n_files = len(inputs)
    detector = Detector.load(str(model), device=local_device(resolve_device(args.device)))
    failed: list[tuple[str, str]] = []
    aligned: dict[str, dict] = {}  # models with alignment: per volume, how it was aligned
    n_done = n_abnormal = n_skipped = 0
    t0 = time.time()
    tag = f"detect {shard.label}" if shard is not None else "detect"
    try:
        output = DetectOutputWriter(out, shard=shard, model_version=detector.version)
    except ResultsError as e:
        raise CLIError(str(e)) from e
    bar = None if args.quiet else _tqdm(total=n_files, desc=tag, unit="vol")
    try:
        with output:
            for path in inputs:
                sid = volume_id(path)
                if output.done(sid) and (not args.png or overlay_path(out, sid).exists()):
                    n_skipped += 1  # an earlier run of this shard scored it
                    n_done += 1
                    n_abnormal += output.previous[sid][3] == "1"
                    if bar is not None:
                        bar.update(1)
                    continue
                try:
                    vol = load_volume(path)
                    res = detector.detect(vol.array, affine=vol.affine, name=str(path))
                except VolumeError as exc:  # unreadable, or (models with alignment) not alignable: never scored
                    failed.append((str(path), str(exc)))
                    _eprint(f"[detect] skipped: {exc}")
                    if bar is not None:
                        bar.update(1)
                    continue
                if args.png:  # before the row: a row means its files are all there (a shard can restart)
                    flag = "ABNORMAL" if res.abnormal else "normal"
                    title = f"{sid}: score {float(res.score):.4g} (threshold {float(res.threshold):.4g}) {flag}"
                    single = [a for a, n in enumerate(vol.array.shape) if n == 1]
                    if len(single) == 1:  # a 2-D image: drawn as stored, as image viewers show it
                        save_mosaic(vol.array, res.heatmap, float(res.pixel_threshold), overlay_path(out, sid),
                                    axis=single[0], title=title, origin="upper")
                    else:
                        save_mosaic(to_ras(vol.array, vol.affine), to_ras(res.heatmap, vol.affine),
                                    float(res.pixel_threshold), overlay_path(out, sid), axis=int(res.slice_axis),
                                    title=title)
                output.add(sid, res.heatmap, vol.affine, res.score, res.threshold, res.abnormal)
                if res.alignment:
                    aligned[sid] = {k: res.alignment[k] for k in ("similarity", "scales", "seconds", "matrix_ras",
                                                                  "deformable") if k in res.alignment}
                n_done += 1
                n_abnormal += int(bool(res.abnormal))
                if bar is not None:
                    bar.set_postfix_str(f"{sid} {'ABN' if res.abnormal else 'ok'}", refresh=False)
                    bar.update(1)
                del vol, res
            alignment = detector.alignment
            output.finish(model=str(model), version=detector.version,
                          pixel_threshold=float(detector.calibration.pixel_threshold), n_inputs=n_files,
                          n_done=n_done, failed=failed, seconds=time.time() - t0,
                          alignment=None if alignment is None else {
                              "method": alignment.method, "reference": alignment.reference.name,
                              "metric_floor": alignment.metric_floor, "volumes": aligned})
    finally:
        if bar is not None:
            bar.close()
    aligned_note = f" (each aligned to the model's {alignment.reference.name} reference first)" if alignment else ""
    failed_note = (f"; {len(failed)} input(s) could not be read" + (" or aligned" if alignment else "") + " (see above)"
                   if failed else "")
    if shard is None:
        print(f"{n_done} volume(s) scored, {n_abnormal} abnormal; heatmaps and scores.csv in {out}" + aligned_note
              + failed_note)
        return EXIT_BAD_INPUT if failed else EXIT_OK
    from spmamba.results import shard_status

    status = shard_status(out, shard.count)
    merged = (f"all {shard.count} shards done: scores.csv built" if not status["missing"] else
              f"waiting for shard(s) {', '.join(f'{k}/{shard.count}' for k in status['missing'])} (the last to "
              f"finish builds scores.csv; or: spmamba detect --merge {out})")
    print(f"shard {shard.label}: {n_done} of {n_files} volume(s) scored ({n_skipped} by an earlier run), "
          f"{n_abnormal} abnormal; heatmaps in {out}; {merged}" + aligned_note + failed_note)
    return EXIT_BAD_INPUT if failed else EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from spmamba.metrics import evaluate_folder, format_table

    bar = None if args.quiet else _tqdm(total=None, desc="evaluate", unit="vol", leave=False)

    def progress(done: int, total: int, sid: str) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(sid, refresh=False)
            bar.refresh()

    sade = args.protocol == "sade"
    if sade:
        missing = [opt for opt, val in (("--images", args.images), ("--normal-pred", args.normal_pred),
                                        ("--normal-images", args.normal_images)) if not val]
        if missing:
            if bar is not None:
                bar.close()
            raise CLIError(f"--protocol sade needs {', '.join(missing)}: the brain masks come from the input images "
                           "and the thresholds from the heatmaps of normal volumes (a detect output of held-out "
                           "normals and their images)")
    elif args.normal_pred or args.normal_images or args.voxel_fpr is not None:
        raise CLIError("--normal-pred, --normal-images and --voxel-fpr belong to --protocol sade")
    try:
        if sade:
            from spmamba.metrics_sade import DEFAULT_FPRS, evaluate_sade, format_sade_table

            result = evaluate_sade(args.pred, args.masks, args.images, args.normal_pred, args.normal_images,
                                   fprs=args.voxel_fpr or DEFAULT_FPRS, progress=progress)
        else:
            result = evaluate_folder(args.pred, args.masks, args.labels, threshold=args.threshold,
                                     images_dir=args.images, min_region_voxels=args.min_region_voxels,
                                     progress=progress)
    finally:
        if bar is not None:
            bar.close()
    json_path = Path(args.json) if args.json else Path(args.pred) / ("metrics_sade.json" if sade else "metrics.json")
    if str(json_path) == "-":
        print(json.dumps(result, indent=2, default=json_default))
        return EXIT_OK
    print(format_sade_table(result) if sade else format_table(result))
    write_json(json_path, result)
    print(f"(JSON: {json_path})")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# serve / demo
# ----------------------------------------------------------------------------------------------------------------
class _StopSignals:
    """While a server runs: SIGINT, SIGTERM and SIGHUP (the terminal closing) act like Ctrl-C, a KeyboardInterrupt
    in the main thread, so the server and its children are stopped however this command is asked to end. SIGINT is
    set too because a command started in the background by a script (``spmamba serve ... &``) inherits it ignored,
    and Python then installs no Ctrl-C handler: ``kill -INT`` did nothing (as ``spmamba train``'s stop flag, which
    sets it as well)."""

    def __init__(self) -> None:
        self._old: dict = {}

    @staticmethod
    def _handler(signum, frame) -> None:  # noqa: ARG004
        raise KeyboardInterrupt

    def __enter__(self) -> "_StopSignals":
        for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
            if sig is None:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _run_server(tag: str, studies: Path | str, args: argparse.Namespace, conf: dict, log_dir: Path | None,
                requested_model: Path | None, hint_model_option: bool, env: dict | None = None) -> int:
    """Serve until Ctrl-C (or SIGTERM / SIGHUP): then stop the server and its children quietly, print one line and
    return 0 (stopping a server is not an error)."""
    from spmamba import server

    with _StopSignals():
        try:
            rc = server.serve(studies=str(studies), app_dir=args.app_dir, host=args.host, port=args.port,
                              conf=conf or None, block=True, log_dir=str(log_dir) if log_dir else None, env=env,
                              on_ready=lambda url: _eprint(server.ready_report(tag, url, studies, requested_model,
                                                                               hint_model_option)))
        except KeyboardInterrupt:
            _eprint(f"[{tag}] stopped")
            return EXIT_OK
        except RuntimeError as e:  # port in use, or the server exited before it answered (its output says why)
            raise CLIError(str(e)) from None
    if rc:
        _eprint(f"[{tag}] the server exited with code {rc}")
        return 1
    return EXIT_OK


def _count_volumes(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and _is_image(p))


def cmd_serve(args: argparse.Namespace) -> int:
    conf = {}
    for kv in args.conf or []:
        if "=" not in kv:
            raise CLIError(f"--conf {kv}: expected KEY=VALUE")
        key, value = kv.split("=", 1)
        conf[key] = value
    requested = None
    if args.model:
        if not Path(args.model).is_file():
            raise CLIError(f"{args.model}: model file not found")
        requested = Path(args.model).resolve()
        conf["model"] = str(requested)
    from spmamba import server

    env = server.auth_env(args.auth_issuer, args.auth_client_id)
    warning = server.exposure_warning(args.host, bool(env))
    if warning:
        _eprint(f"[serve] {warning}")
    if server.is_remote(args.studies):  # a DICOMweb PACS: its image series are the studies
        url = args.studies.rstrip("/")
        _eprint(f"[serve] starting the MONAI Label app on http://{args.host}:{args.port} with the image series of the "
                f"PACS at {url} (Ctrl-C stops it)")
        return _run_server("serve", url, args, conf, Path(args.log_dir) if args.log_dir else None, requested,
                           hint_model_option=True, env=env)
    studies = Path(args.studies)
    if not studies.exists():
        if not args.create:
            raise CLIError(f"{studies}: no such folder. Pass the folder that holds your {_supported()} studies "
                           "with --studies DIR, or add --create to start with an empty one")
        studies.mkdir(parents=True)
        _eprint(f"[serve] created the empty studies folder {studies.resolve()}: copy volumes into it or upload "
                "them from the Slicer module")
    elif not studies.is_dir():
        raise CLIError(f"{studies}: not a folder")
    elif _count_volumes(studies) == 0:
        _eprint(f"[serve] {studies.resolve()} holds no {_supported()} studies yet")
    _eprint(f"[serve] starting the MONAI Label app on http://{args.host}:{args.port} (Ctrl-C stops it)")
    return _run_server("serve", studies.resolve(), args, conf, Path(args.log_dir) if args.log_dir else None,
                       requested, hint_model_option=True, env=env)


def cmd_login(args: argparse.Namespace) -> int:
    from spmamba import remote

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        import getpass

        password = getpass.getpass(f"password of {args.user} at {args.url}: ")
    if not password:
        raise CLIError("no password given")
    try:
        remote.sign_in(args.url, args.user, password)
    except remote.SignInError as e:
        raise CLIError(str(e)) from None
    stored = remote.remember(args.url, args.user, None if args.no_remember else password)
    where = ("the password is in the system keyring" if stored else
             "the password was not stored (" + ("--no-remember" if args.no_remember else "no system keyring") +
             "): you will be asked again")
    print(f"signed in to {args.url} as {args.user}; {where}")
    return EXIT_OK


def cmd_logout(args: argparse.Namespace) -> int:
    from spmamba import remote

    remote.forget(args.url)
    print(f"forgot the sign-in of {args.url}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    if args.train_minutes is not None and args.train_minutes < 0:
        raise CLIError(f"--train-minutes {args.train_minutes}: must be >= 0")
    from spmamba import demo

    demo_dir = Path(args.dir)
    studies = demo.prepare_demo(demo_dir, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                           spacing=args.spacing, quiet=args.quiet)
    train_dir = demo_dir / "train"
    model = Path(args.model) if args.model else demo.demo_model_path(demo_dir)
    if args.model and model.is_file():
        _eprint(f"[demo] using existing model {model} (given with --model)")
    else:
        settings = demo.demo_settings(config=args.config, epochs=args.epochs, train_minutes=args.train_minutes,
                                      n_train=args.n_train, n_test=args.n_test, seed=args.seed, spacing=args.spacing)
        digest = demo.files_digest(sorted(train_dir.glob("*.nii.gz")))
        reusable, why = demo.demo_model_status(model, settings, digest)
        if reusable:
            _eprint(f"[demo] using existing model {model}: {why}")
        else:
            if model.exists():
                _eprint(f"[demo] not using {model}: {why}")
                if not demo.provenance_path(model).is_file() or "changed after" in why:
                    aside = model.with_name(model.name + time.strftime(".replaced-%Y%m%d-%H%M%S"))
                    os.replace(model, aside)
                    _eprint(f"[demo] moved it to {aside}")
            limit = args.train_minutes or None
            _eprint(f"[demo] training a quick model ({args.config} preset) on {train_dir} -> {model}"
                    + (f"; at most {limit:g} min of wall time including calibration (--train-minutes; a longer "
                       "run gives a better model)" if limit else ""))
            s = train_model(str(train_dir), str(model), config=args.config, epochs=args.epochs, device=args.device,
                            time_limit_min=limit, quiet=args.quiet, origin=demo.DEMO_MADE_BY)
            demo.write_provenance(model, settings, digest, s, _version())
            if s.get("stopped_early"):  # Ctrl-C during the demo's training means: stop the demo
                _eprint(f"[demo] stopped: the model trained so far is in {model} (calibrated; the next `spmamba "
                        f"demo` trains again). Serve it with: spmamba serve --studies {studies} --model {model}")
                return EXIT_OK
            _eprint(f"[demo] model ready in {s['seconds']:.0f} s: {model}")
    if args.no_serve:
        _eprint(f"[demo] model: {demo.describe_model(model)}")
        print(f"demo ready: studies {studies}, model {model}")
        return EXIT_OK
    conf = {"model": str(model.resolve()), "model_dir": str((demo_dir / "model" / "app").resolve())}
    _eprint(f"[demo] starting the MONAI Label app on http://{args.host}:{args.port} (Ctrl-C stops it)")
    return _run_server("demo", studies.resolve(), args, conf, (demo_dir / "logs").resolve(), model.resolve(),
                       hint_model_option=False)


# ----------------------------------------------------------------------------------------------------------------
# parser and entry point
# ----------------------------------------------------------------------------------------------------------------
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("spmamba")
    except Exception:  # noqa: BLE001
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spmamba", description="Unsupervised anomaly detection in medical volumes "
                                "(SP-Mamba): make data, train on normal scans, detect, evaluate, serve.")
    p.add_argument("--version", action="version", version=f"spmamba {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("synth", help="make brain-MRI phantoms with simulated lesions (no download)",
                       description="Write OUT/train/*.nii.gz (normal), OUT/test/images/*.nii.gz, OUT/test/masks/"
                       "*.nii.gz (0/1, same grid) and OUT/test/labels.csv (id,abnormal,family,lesion_voxels,"
                       "n_lesions). About half the test set is abnormal. Deterministic per seed.")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--n-train", type=int, default=24, help="normal training volumes (default 24)")
    s.add_argument("--n-test", type=int, default=32, help="test volumes, about half abnormal (default 32)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2; 4-6 for quick tests)")
    s.add_argument("--abnormal-fraction", type=float, default=0.5, help="share of abnormal test volumes (0.5)")
    s.add_argument("--families", default=None,
                   help="comma-separated lesion families (default all: tumour,ms,infarct,haemorrhage)")
    s.add_argument("--unregistered", action="store_true",
                   help="subjects as a scanner places them: random head pose (rotation up to 15 deg per axis, shift "
                   "15 mm, scale 0.9-1.1), a stronger warp, each on its own grid (affine, voxel order and shape vary); "
                   "poses in OUT/poses.json and extra labels.csv columns")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_synth)

    t = sub.add_parser("train", help="train on a folder of normal volumes and calibrate thresholds",
                       description="Train a model (SP-Mamba by default, --method) on normal volumes or 2-D images; "
                       "a held-out share is used to calibrate the pixel and volume thresholds. Ctrl-C stops early and "
                       "still saves a valid, calibrated model.")
    t.add_argument("--normal", required=True, metavar="DIR",
                   help="folder of normal volumes (.nii/.nii.gz/.nrrd), subfolders each holding one DICOM series, or "
                   "2-D images (.png/.jpg/.dcm)")
    t.add_argument("--out", required=True, metavar="MODEL.pt", help="checkpoint file to write")
    t.add_argument("--method", default=None, metavar="NAME",
                   help="anomaly-detection method: spmamba (default), voxelwise (per-voxel statistics of normals on "
                   "one grid; use --align affine for unregistered volumes), memmc_mae (memory-augmented masked "
                   "autoencoder, 2-D), spatial_msma (3-D score matching with a position-aware flow) or any "
                   "registered one")
    t.add_argument("--config", default=None, metavar="NAME",
                   help="preset of the method: for spmamba, memmc_mae and spatial_msma paper, fast (default) or "
                   "tiny; for voxelwise default")
    t.add_argument("--set", dest="settings", action="append", default=None, metavar="KEY=VALUE",
                   help="change one setting of the preset, e.g. --set memory_slots=0 (repeat for more; ablations "
                   "and experiments); a wrong name lists the method's settings. Recorded in the model file")
    t.add_argument("--epochs", type=int, default=None, help="override the preset's number of epochs")
    t.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="samples per optimisation step (of each process under torchrun) instead of the preset's; "
                        "the learning rate follows it")
    t.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    t.add_argument("--resume", default=None, metavar="CKPT", help="continue from a checkpoint")
    t.add_argument("--encoder-weights", default="none", metavar="W",
                   help="encoder weights: none (default, no download), imagenet or a .pt/.pth file")
    t.add_argument("--val-fraction", type=float, default=0.2, help="share of normals held out for calibration")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop after N optimisation steps in all (quick smoke runs; the model is still calibrated)")
    t.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                   help="wall-time limit in minutes for the whole training, encoder norm adaptation and calibration "
                   "included: training stops early enough to calibrate and save within it")
    t.add_argument("--position-normalise", action="store_true", default=None,
                   help="for volumes registered to one template grid: z-score every heatmap voxel against the "
                   "heatmaps of the training normals at that position (better volume scores on such data; the "
                   "model then refuses volumes on another grid). Default: on when the model aligns, else off")
    t.add_argument("--no-position-normalise", dest="position_normalise", action="store_false",
                   help="turn position-aware normalisation off (also when the model aligns)")
    t.add_argument("--fusion", choices=("auto", "none", *FUSIONS), default="auto",
                   help="with position-aware normalisation: fuse the normalised heatmap with the |z| map of each "
                   "voxel's intensity against the training normals at that position (geometric: sqrt of the product, "
                   "high only where both depart from normal; mean; max). auto (default): geometric for methods that "
                   "fuse (not the voxel-wise method) when position-aware normalisation is on; none: the model's map alone"),
    t.add_argument("--intensity-search", type=float, default=None, metavar="MM",
                   help="with a fusion: each voxel's intensity |z| is the smallest against the normals within MM mm "
                   "of it, which forgives residual misregistration at tissue boundaries and keeps lesions that differ "
                   f"from every tissue nearby (default {INTENSITY_SEARCH_MM:g}; 0: the plain |z|; "
                   "docs/BENCHMARKS.md, 'local search')")
    t.add_argument("--align", choices=("auto", "none", "affine", "deformable"), default=None,
                   help="registration of every volume to a reference before training and detection (stored in the "
                   "model; detect follows it). auto (default for a new model): deformable to the MNI152 template "
                   "when the normals are brains that register to it, else none; affine: affine to "
                   "--align-reference; deformable: affine, then a smooth diffeomorphic (demons) deformation. When resuming: the "
                   "model's setting")
    t.add_argument("--align-reference", default="auto", metavar="REF",
                   help="with --align affine or deformable: auto (default: MNI152 when the normals are brains that register to "
                   "it, else built from them), normals (built from the training normals), mni152 (nilearn's "
                   "skull-stripped MNI152 T1 template, 2 mm; mni152:MM for another spacing) or a volume file")
    t.add_argument("--teacher-pretrain", default="none", metavar="OBJ",
                   help="self-supervised pretraining of the encoder (teacher) on the training slices before "
                   "distillation: inpaint (masked patches) or denoise (coarse noise); default none. Under "
                   "--time-limit it gets at most a quarter of the time left")
    t.add_argument("--pretrain-steps", type=int, default=None, metavar="N",
                   help="steps of --teacher-pretrain (default 80)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("pretrain", help="pretrain a reusable in-domain teacher (encoder) on normal volumes",
                       description="Self-supervised pretraining of SP-Mamba's ResNet encoder on the slices of normal "
                       "volumes (the training share of --normal, split as `spmamba train` splits it with the same "
                       "--val-fraction and --seed), then its BatchNorm statistics re-estimated on clean slices; "
                       "writes TEACHER.pt atomically (torchvision ResNet format + a record of the pretraining) for "
                       "`spmamba train --encoder-weights TEACHER.pt`. Ctrl-C stops early and still saves.")
    r.add_argument("--normal", required=True, metavar="DIR", help="folder of normal .nii/.nii.gz/.nrrd volumes")
    r.add_argument("--out", required=True, metavar="TEACHER.pt", help="teacher file to write")
    r.add_argument("--objective", default="inpaint", metavar="OBJ",
                   help="inpaint (default: reconstruct masked patches) or denoise (remove coarse noise)")
    how = r.add_mutually_exclusive_group()
    how.add_argument("--steps", type=int, default=None, metavar="N", help="optimisation steps (default 80)")
    how.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                     help="wall-time limit in minutes instead of a number of steps")
    r.add_argument("--config", default=None, metavar="NAME",
                   help="SP-Mamba preset whose encoder and slice size are used: fast (default), paper or tiny")
    r.add_argument("--encoder-weights", default="none", metavar="W",
                   help="start from: none (random, default), imagenet or a .pth file")
    r.add_argument("--val-fraction", type=float, default=0.2, help="share of normals left out (as in train)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_pretrain)

    d = sub.add_parser("detect", help="anomaly heatmaps and scores for volumes",
                       description="Writes DIR/<id>_anomaly.nii.gz (float32, same shape and affine as the input), "
                       "DIR/scores.csv (id,score,threshold,abnormal), DIR/detect.json (model, pixel threshold) and, "
                       "with --png, DIR/<id>_overlay.png. Volumes are processed one at a time. Exit code 2 when an "
                       "input could not be read (the others are still processed).")
    d.add_argument("--model", default=None, metavar="MODEL.pt", help="model file (required unless --merge)")
    d.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="volume files (.nii/.nii.gz/.nrrd), DICOM series folders (one volume each), 2-D images "
                   "(.png/.jpg/.dcm: one slice), or folders of these")
    d.add_argument("--out", default=None, metavar="DIR", help="output folder (required unless --merge)")
    d.add_argument("--shard", default=None, metavar="K/N",
                   help="detect share K of N of the inputs (0 <= K < N; default under torchrun: RANK/WORLD_SIZE); "
                        "restartable: what this shard already wrote is skipped; the last shard to finish builds "
                        "scores.csv")
    d.add_argument("--merge", default=None, metavar="DIR",
                   help="build DIR/scores.csv and detect.json from the finished shards in DIR")
    d.add_argument("--png", action="store_true", help="also write a slice mosaic with the heatmap overlaid")
    d.add_argument("--device", default="auto")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_detect)

    e = sub.add_parser("evaluate", help="image, pixel and lesion metrics of a detect output against masks",
                       description="Image AUROC/AP/F1-max, pixel AUROC/AP/AUPRO/best Dice, lesion-wise TPR/PPV, "
                       "HD99 and mean surface distance. Prints a table and writes JSON (default PRED/metrics.json).")
    e.add_argument("--pred", required=True, metavar="DIR", help="a `spmamba detect` output folder")
    e.add_argument("--masks", required=True, metavar="DIR", help="ground-truth masks <id>.nii.gz (0/1)")
    e.add_argument("--labels", default=None, metavar="CSV", help="id,abnormal (default: abnormal = mask not empty)")
    e.add_argument("--json", default=None, metavar="PATH", help="where to write the JSON ('-' = print it instead)")
    e.add_argument("--threshold", type=float, default=None,
                   help="heatmap threshold for lesion metrics (default: the model's calibrated pixel threshold)")
    e.add_argument("--images", default=None, metavar="DIR",
                   help="input images: restrict pixel metrics to their non-zero voxels (foreground)")
    e.add_argument("--min-region-voxels", type=int, default=1, help="drop predicted regions smaller than this")
    e.add_argument("--protocol", choices=("product", "sade"), default="product",
                   help="product (default): the metrics above; sade: the lesion protocol of Spatial-MSMA's public "
                   "code (thresholds at voxel false-positive rates of normal heatmaps inside the eroded brain mask, "
                   "components under 3 voxels dropped, lesion TPR/PPV, directed GT-to-prediction HD99/MSD; "
                   "needs --images, --normal-pred, --normal-images; JSON default PRED/metrics_sade.json)")
    e.add_argument("--normal-pred", default=None, metavar="DIR",
                   help="sade: a `spmamba detect` output folder of held-out normal volumes (the thresholds)")
    e.add_argument("--normal-images", default=None, metavar="DIR", help="sade: those normal volumes' images")
    e.add_argument("--voxel-fpr", type=float, nargs="+", default=None, metavar="FPR",
                   help="sade: voxel false-positive rates of the thresholds (default 0.05 0.1, as the code)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)

    v = sub.add_parser("serve", help="start the MONAI Label server on 127.0.0.1",
                       description="Serves the studies in DIR with the MONAI Label app. Once it answers, it says which "
                       "model it serves (version, preset, how and when it was trained) and what to do next. Without "
                       "--model the app serves the model it published last (apps/spmamba_app/model/spmamba.pt, or "
                       "--conf model_dir=DIR), if any. Ctrl-C stops it (exit 0).")
    v.add_argument("--studies", default="studies", metavar="DIR|URL",
                   help="folder of studies: volumes (.nii/.nii.gz/.nrrd) or 2-D images (.png/.jpg/.dcm) (default "
                   "./studies; it must exist unless --create), or the DICOMweb URL of a PACS (e.g. "
                   "http://127.0.0.1:8042/dicom-web): its image series are the studies (docs/DEPLOY.md)")
    v.add_argument("--create", action="store_true", help="create the studies folder when it does not exist")
    v.add_argument("--model", default=None, metavar="MODEL.pt",
                   help="serve this checkpoint (a `spmamba train` output); default: the app's published model")
    v.add_argument("--log-dir", default=None, metavar="DIR",
                   help="where MONAI Label writes app.log (default: its own, APP/logs)")
    v.add_argument("--app-dir", default=None, metavar="DIR", help="the MONAI Label app (default apps/spmamba_app)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="app option (repeatable)")
    v.add_argument("--auth-issuer", default=None, metavar="URL",
                   help="turn sign-in on: the OpenID Connect issuer (e.g. a Keycloak realm URL) whose tokens the "
                   "server accepts; roles admin/reviewer/annotator/user (docs/DEPLOY.md). Default: no sign-in, "
                   "which is only safe on 127.0.0.1")
    v.add_argument("--auth-client-id", default=None, metavar="ID",
                   help="the issuer's client id for password sign-in (default MONAI Label's monailabel-app)")
    v.set_defaults(func=cmd_serve)

    li = sub.add_parser("login", help="sign in to an SP-Mamba server that has sign-in on",
                        description="Checks the user name and password with the server (its OpenID Connect "
                        "issuer) and remembers the URL and user name; the password goes to the system keyring when "
                        "there is one (never to a file), so later commands sign in without asking.")
    li.add_argument("url", metavar="URL", help="the server, e.g. https://spmamba.hospital.example")
    li.add_argument("--user", required=True, metavar="NAME")
    li.add_argument("--password-stdin", action="store_true",
                    help="read the password from standard input (scripts) instead of asking")
    li.add_argument("--no-remember", action="store_true", help="do not store the password in the keyring")
    li.set_defaults(func=cmd_login)

    lo = sub.add_parser("logout", help="forget the user name and the stored password of a server")
    lo.add_argument("url", metavar="URL")
    lo.set_defaults(func=cmd_logout)

    m = sub.add_parser("demo", help="make demo studies and a quick model, then serve them on 127.0.0.1:8000",
                       description="Makes ./demo with `synth` (skipped if present), trains a quick model into "
                       "./demo/model/demo.pt unless one that `spmamba demo` made with the same settings on the same "
                       "volumes is there (a provenance record beside it says so), then starts the MONAI Label server "
                       "with the demo studies (models retrained from Slicer go to ./demo/model/app, logs to "
                       "./demo/logs). Ctrl-C stops it (exit 0).")
    m.add_argument("--dir", default="demo", help="demo folder (default ./demo)")
    m.add_argument("--n-train", type=int, default=20)
    m.add_argument("--n-test", type=int, default=12)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--config", default="fast", help="training preset (default fast)")
    m.add_argument("--epochs", type=int, default=None)
    m.add_argument("--train-minutes", type=float, default=10.0,
                   help="wall-time limit of the demo's training, calibration included (default 10; 0 = the "
                   "preset's full schedule)")
    m.add_argument("--spacing", type=float, default=2.0, help="voxel size of the demo studies in mm")
    m.add_argument("--device", default="auto")
    m.add_argument("--model", default=None, metavar="MODEL.pt",
                   help="serve this model if it exists (else train it) instead of ./demo/model/demo.pt")
    m.add_argument("--app-dir", default=None, metavar="DIR")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8000)
    m.add_argument("--no-serve", action="store_true", help="prepare data and model, do not start the server")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(func=cmd_demo)
    return p


def _library_input_errors() -> tuple[type[BaseException], ...]:
    """The library's errors for unusable input (each message names the file and the problem)."""
    from spmamba.checkpoint import CheckpointError
    from spmamba.metrics import EvaluationError
    from spmamba.train import TrainingDataError
    from spmamba.io import VolumeError
    from spmamba.models.encoder import EncoderWeightsError
    from spmamba.results import ResultsError

    return VolumeError, TrainingDataError, CheckpointError, EvaluationError, EncoderWeightsError, ResultsError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spmamba`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _eprint(f"spmamba {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:  # pragma: no cover
            pass
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, CLIError) or isinstance(exc, _library_input_errors()):
            _eprint(f"spmamba {args.command}: error: {exc}")
            return EXIT_BAD_INPUT
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            _eprint(f"spmamba {args.command}: error: {exc}")
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
