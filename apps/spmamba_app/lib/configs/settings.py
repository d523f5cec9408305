"""The app's settings, read once from MONAI Label's ``--conf key value`` pairs.

Every value arrives as a string; this module turns them into typed fields and rejects nonsense at start-up with a
message that names the option, so a typo in ``--conf`` fails loudly instead of silently using a default.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional

CURATION_KEY = "curation"
CURATION_STATES = ("normal", "abnormal", "excluded")
SCORE_KEY = "anomaly"
MODEL_FILENAME = "spmamba.pt"
STATS_FILENAME = "train_stats.json"
STOP_FILENAME = "train_stop.request"
FOREGROUND_DIRNAME = ".foreground"  # a marker per running detection; a training pauses while one is there

#: keys MONAI Label itself reads from the app's conf (``MONAILabelApp.__init__``: ``server_mode``); accepted and
#: passed through in ``AppSettings.extra``. Every other key must be one of the app's own (the fields below).
MONAILABEL_KEYS = ("server_mode",)


class ConfError(ValueError):
    """A ``--conf`` value the app cannot start with; the message is one line that names the key."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(conf: Dict[str, Any], key: str, default: bool) -> bool:
    value = conf.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfError(f"--conf {key} {value!r}: expected true or false")


def _number(conf: Dict[str, Any], key: str, default: Any, minimum: float, parse: Callable[[str], Any], what: str,
            unit: str = "") -> Any:
    """``conf[key]`` parsed by ``parse`` (``what`` it expects, for the message), at least ``minimum``; ``default``
    when absent or auto/default."""
    value = conf.get(key)
    if value is None or str(value).strip().lower() in ("", "none", "auto", "default"):
        return default
    try:
        number = parse(str(value).strip())
    except ValueError:
        raise ConfError(f"--conf {key} {value!r}: expected {what}") from None
    if not number >= minimum:  # (not >=: a NaN is refused too)
        raise ConfError(f"--conf {key} {value!r}: must be >= {minimum}{unit}")
    return number


def _int(conf: Dict[str, Any], key: str, default: Optional[int], minimum: int = 0) -> Optional[int]:
    return _number(conf, key, default, minimum, int, "an integer")


def _distance_mm(conf: Dict[str, Any], key: str) -> Optional[float]:
    """A distance in mm, 0 or more; None when absent or auto/default."""
    return _number(conf, key, None, 0, float, "a distance in mm", unit=" (mm; 0 = off)")


@dataclass
class AppSettings:
    """Typed view of the app's ``--conf`` options (see docs/APP.md for the table)."""

    app_dir: str
    method: str = "spmamba"  # the anomaly-detection method the app trains and serves (spmamba.methods)
    preset: str = "fast"  # one of the method's presets; default: the method's default preset
    device: str = "auto"
    slice_axis: Optional[int] = None  # training only: new models' slice axis (None = the library's, axial)
    encoder_weights: str = "none"
    teacher_pretrain: str = "none"  # training: in-domain pretraining of the method's teacher (spmamba: inpaint|denoise)
    unflagged_normal: bool = False
    model: Optional[str] = None  # a checkpoint made by `spmamba train`; None = only the app's model folder
    model_dir: str = ""
    epochs: Optional[int] = None
    min_normals: int = 2
    auto_score: bool = True
    auto_train: bool = False
    infer_workers: int = 2
    top_regions: int = 10
    stop_grace_s: int = 20  # DELETE /train/: time for the training to notice the stop (finish its step)
    stop_max_s: int = 80  # ... and for the whole graceful stop (calibrate + publish); then it is killed
    keep_versions: int = 5  # published models kept in <model_dir>/versions for rollback (0 = none)
    # training: auto (deformable to MNI152 for brains that fit it) | affine | deformable | none; detection follows the model
    align: str = "auto"
    align_reference: str = "auto"  # auto | normals | mni152[:MM] | a volume file
    # training: auto (the library's default: geometric for methods that fuse, when the model aligns) | none | one of
    # spmamba.scoring.FUSIONS: the normalised map fused with the intensity |z| map
    fusion: str = "auto"
    # training: the fused intensity |z| map's search distance in mm (None: the library's default,
    # spmamba.scoring.INTENSITY_SEARCH_MM; 0: the plain |z| map)
    intensity_search_mm: Optional[float] = None
    seed_curation: str = ""
    # studies from a PACS (--studies http[s]://HOST/dicom-web): its URL, where series are cached and curated, how
    # often the series list is asked again, which modalities, the PACS's timeout, and whether every detection of a
    # PACS series is stored back as a DICOM Parametric Map + Segmentation (else only when a request asks)
    dicomweb: str = ""
    dicomweb_cache: str = ""
    dicomweb_refresh_s: int = 30
    dicomweb_modality: str = ""
    dicomweb_timeout_s: int = 30
    pacs_results: bool = False
    # training in this many local processes (data-parallel, torchrun under the hood; spmamba.launch); 1 = in the
    # training subprocess itself
    train_processes: int = 1
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def published_model(self) -> str:
        """Where the training task publishes (atomically) and where inference looks first."""
        return os.path.join(self.model_dir, MODEL_FILENAME)

    @property
    def stop_calibration_s(self) -> float:
        """Seconds a training has, once it sees a stop request, to calibrate and be ready to publish: what is left
        of ``stop_max_s`` after ``stop_grace_s`` (to notice it) and 10 s for publishing (at least 5 s)."""
        return float(max(5, self.stop_max_s - self.stop_grace_s - 10))

    @property
    def stats_path(self) -> str:
        return os.path.join(self.model_dir, STATS_FILENAME)

    @property
    def stop_path(self) -> str:
        return os.path.join(self.model_dir, STOP_FILENAME)

    @property
    def foreground_dir(self) -> str:
        """Where each running detection holds its marker (``spmamba.cpu.foreground``); the training task pauses
        between steps while one is there (``spmamba.cpu.foreground_busy``)."""
        return os.path.join(self.model_dir, FOREGROUND_DIRNAME)

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("extra", None)
        return d


def conf_keys() -> set:
    """Every key ``--conf`` accepts: the settings' fields (not ``app_dir``/``extra``) and MONAI Label's own."""
    own = {f.name for f in fields(AppSettings)} - {"app_dir", "extra", "dicomweb"}
    return own | set(MONAILABEL_KEYS)


def library_methods() -> List[str]:
    """The methods ``spmamba`` knows (``spmamba.methods.method_names``)."""
    from spmamba.methods import method_names

    return method_names()


def library_presets(method: str = "spmamba") -> List[str]:
    """The training presets ``spmamba`` offers for ``method`` (a method of ``library_methods``: its ``PRESETS``)."""
    from spmamba.methods import get_method

    return sorted(get_method(method).PRESETS)


def default_preset(method: str) -> str:
    """The method's default preset ("fast" for SP-Mamba)."""
    from spmamba.methods import get_method

    return get_method(method).default_preset


def parse_conf(app_dir: str, studies: str, conf: Optional[Dict[str, Any]]) -> AppSettings:
    """Build :class:`AppSettings` from MONAI Label's conf dict; raises :class:`ConfError` (a ``ValueError``) with a
    one-line message naming the bad key: unknown keys, an unknown preset and malformed values are refused."""
    conf = dict(conf or {})
    known = conf_keys()
    unknown = sorted(str(k) for k in conf if k not in known)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        own = sorted(known - set(MONAILABEL_KEYS))
        raise ConfError(f"--conf {key}: unknown setting{hint}; valid keys: {', '.join(own)}")
    method = str(conf.get("method", "spmamba")).strip() or "spmamba"
    methods = library_methods()
    if method not in methods:
        raise ConfError(f"--conf method {method!r}: unknown method; choose one of {', '.join(methods)}")
    preset = str(conf.get("preset", "")).strip() or default_preset(method)
    presets = library_presets(method)
    if preset not in presets:
        raise ConfError(f"--conf preset {preset!r}: unknown preset of method {method}; choose one of "
                        f"{', '.join(presets)}")
    device = str(conf.get("device", "auto")).strip().lower() or "auto"
    if not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise ConfError(f"--conf device {device!r}: expected auto, cpu or cuda[:N]")

    axis_raw = str(conf.get("slice_axis", "auto")).strip().lower()
    axis_names = {"sagittal": 0, "coronal": 1, "axial": 2, "x": 0, "y": 1, "z": 2}
    if axis_raw in ("", "auto", "none", "model"):
        slice_axis = None
    elif axis_raw in axis_names:
        slice_axis = axis_names[axis_raw]
    else:
        slice_axis = _int(conf, "slice_axis", None)
        if slice_axis not in (0, 1, 2):
            raise ConfError(f"--conf slice_axis {axis_raw!r}: expected auto, 0, 1, 2, sagittal, coronal or axial")

    model = conf.get("model")
    model = os.path.realpath(os.path.expanduser(str(model))) if model not in (None, "", "none") else None
    model_dir = conf.get("model_dir") or os.path.join(app_dir, "model")
    model_dir = os.path.realpath(os.path.expanduser(str(model_dir)))

    encoder_weights = str(conf.get("encoder_weights", "none")).strip() or "none"
    if encoder_weights.lower() not in ("none", "imagenet") and not os.path.isfile(os.path.expanduser(encoder_weights)):
        raise ConfError(f"--conf encoder_weights {encoder_weights!r}: no such file (or use 'none')")

    teacher_pretrain = str(conf.get("teacher_pretrain", "none")).strip().lower() or "none"
    if teacher_pretrain != "none":
        from spmamba.methods import get_method

        objectives = tuple(get_method(method).PRETRAIN_OBJECTIVES)
        if not objectives:
            raise ConfError(f"--conf teacher_pretrain {teacher_pretrain!r}: method {method} has no teacher to "
                            "pretrain; use none")
        if teacher_pretrain not in objectives:
            raise ConfError(f"--conf teacher_pretrain {teacher_pretrain!r}: expected none, {', '.join(objectives)}")

    from spmamba.registration import ALIGN_METHODS, DEFAULT_ALIGN  # torch is loaded by then (method checks)

    align = str(conf.get("align", DEFAULT_ALIGN)).strip().lower() or DEFAULT_ALIGN
    if align not in ALIGN_METHODS:
        raise ConfError(f"--conf align {align!r}: expected one of {', '.join(ALIGN_METHODS)}")
    align_reference = str(conf.get("align_reference", "auto")).strip() or "auto"
    if not (align_reference in ("auto", "normals", "mni152") or align_reference.startswith("mni152:")
            or os.path.isfile(os.path.expanduser(align_reference))):
        raise ConfError(f"--conf align_reference {align_reference!r}: expected auto, normals, mni152[:MM] or a "
                        "volume file")

    from spmamba.scoring import FUSIONS

    fusion = str(conf.get("fusion", "auto")).strip().lower() or "auto"
    if fusion not in ("auto", "none", *FUSIONS):
        raise ConfError(f"--conf fusion {fusion!r}: expected auto, none, {', '.join(FUSIONS)}")
    if fusion not in ("auto", "none") and align == "none":
        raise ConfError(f"--conf fusion {fusion!r} compares intensities by position and needs aligned volumes; "
                        "use align auto/affine/deformable, or fusion none")
    intensity_search_mm = _distance_mm(conf, "intensity_search_mm")
    if intensity_search_mm is not None and (fusion == "none" or align == "none"):
        raise ConfError(f"--conf intensity_search_mm {conf['intensity_search_mm']!r} applies to the fused intensity "
                        "map, and this app fits none (fusion none or align none); drop it")

    remote = bool(studies) and studies.lower().startswith(("http://", "https://"))
    seed = conf.get("seed_curation")
    if seed is None:
        seed = os.path.join(studies, "curation.csv") if studies and not remote else ""
    dicomweb_cache = ""
    if remote:
        from monailabel.config import settings as ml

        root = (conf.get("dicomweb_cache") or ml.MONAI_LABEL_DATASTORE_CACHE_PATH or ml.MONAI_LABEL_DICOMWEB_CACHE_PATH
                or os.path.join(os.path.expanduser("~"), ".cache", "spmamba", "dicomweb"))
        dicomweb_cache = os.path.realpath(os.path.expanduser(str(root).strip()))
    modalities = str(conf.get("dicomweb_modality", "")).strip().upper()
    if modalities and not all(m.strip().isalnum() for m in modalities.split(",")):
        raise ConfError(f"--conf dicomweb_modality {modalities!r}: expected modalities such as MR or MR,CT")

    epochs = _int(conf, "epochs", None, minimum=1)
    if epochs is not None and method in library_methods():
        from spmamba.methods import min_epochs

        if epochs < min_epochs(method):
            raise ConfError(f"--conf epochs {epochs}: method {method} trains in {min_epochs(method)} stages, one "
                            "epoch at least each")
    return AppSettings(
        app_dir=app_dir,
        method=method,
        preset=preset,
        device=device,
        slice_axis=slice_axis,
        encoder_weights=encoder_weights,
        teacher_pretrain=teacher_pretrain,
        unflagged_normal=_bool(conf, "unflagged_normal", False),
        model=model,
        model_dir=model_dir,
        epochs=epochs,
        min_normals=_int(conf, "min_normals", 2, minimum=1) or 2,
        auto_score=_bool(conf, "auto_score", True),
        auto_train=_bool(conf, "auto_train", False),
        infer_workers=_int(conf, "infer_workers", 2, minimum=1) or 2,
        top_regions=_int(conf, "top_regions", 10, minimum=0) or 0,
        stop_grace_s=_int(conf, "stop_grace_s", 20, minimum=0) or 0,
        stop_max_s=_int(conf, "stop_max_s", 80, minimum=0) or 0,
        keep_versions=_int(conf, "keep_versions", 5, minimum=0) or 0,
        align=align,
        fusion=fusion,
        intensity_search_mm=intensity_search_mm,
        align_reference=os.path.expanduser(align_reference) if os.path.isfile(os.path.expanduser(align_reference))
        else align_reference,
        seed_curation=str(seed),
        dicomweb=studies.rstrip("/") if remote else "",
        dicomweb_cache=dicomweb_cache,
        dicomweb_refresh_s=_int(conf, "dicomweb_refresh_s", 30, minimum=0) or 0,
        dicomweb_modality=modalities,
        dicomweb_timeout_s=_int(conf, "dicomweb_timeout_s", 30, minimum=1) or 30,
        pacs_results=_bool(conf, "pacs_results", False),
        train_processes=_int(conf, "train_processes", 1, minimum=1) or 1,
        extra={k: v for k, v in conf.items() if k in MONAILABEL_KEYS},
    )
