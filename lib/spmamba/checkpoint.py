"""One checkpoint file: format tag, model preset, weights, calibration, preprocessing, versions, training summary,
and (optionally) the optimiser state to resume training. Written atomically; read with clear errors."""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any, Union

import torch

from spmamba.atomic import atomic_path

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "FORMAT", "FORMAT_VERSION",
           "weights_digest"]

FORMAT = "spmamba-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model file that is missing, foreign, corrupt or from an incompatible version."""


def weights_digest(state_dict: dict[str, torch.Tensor], extra: Any = None) -> str:
    """Short content hash of weights (+ calibration): the model version shown to users."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    if extra is not None:
        h.update(repr(extra).encode())
    return h.hexdigest()[:12]


def save_checkpoint(path: Union[str, Path], payload: dict[str, Any]) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    with atomic_path(path, fsync=True) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: Union[str, Path], mmap: bool = False) -> dict[str, Any]:
    """Read and check a checkpoint; CheckpointError says what is wrong and what to do.

    ``mmap=True`` maps the tensors instead of reading them (cheap when only the metadata is wanted)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file {path} does not exist; train one with `spmamba train` first")
    if not path.is_file() or path.stat().st_size == 0:
        raise CheckpointError(f"model file {path} is empty or not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (zipfile.BadZipFile, EOFError, RuntimeError, io.UnsupportedOperation, OSError) as e:
        raise CheckpointError(f"model file {path} is corrupt or truncated ({e}); re-train or restore a copy") from e
    except Exception as e:  # unpickling errors of foreign files
        raise CheckpointError(f"model file {path} is not an spmamba checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"model file {path} is not an spmamba checkpoint (no '{FORMAT}' tag)")
    if int(obj.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"model file {path} has format version {obj.get('format_version')}, newer than this spmamba "
            f"understands ({FORMAT_VERSION}); upgrade spmamba"
        )
    for key in ("config", "state_dict", "calibration"):
        if key not in obj:
            raise CheckpointError(f"model file {path} lacks '{key}'; it is incomplete")
    return obj


#: payload entries that hold tensors; ``read_checkpoint_meta`` leaves them out
_TENSOR_KEYS = ("state_dict", "training_state", "position_stats", "alignment_reference")


def read_checkpoint_meta(path: Union[str, Path]) -> dict[str, Any]:
    """A checkpoint's metadata without its tensors and without building the model: ``method`` (absent in files
    written before methods had names: those are SP-Mamba's), ``config`` (with the preset's ``name``), ``calibration``, ``preprocessing``, ``meta`` (``created``, ``training`` summary, library version),
    ``version``, ``format_version`` and, for models that align their inputs, ``alignment`` (method, reference name
    and grid, similarity floor; absent in files without alignment); ``has_position_stats`` /
    ``has_training_state`` say what else it holds.
    The tensors are memory-mapped, not read. Raises CheckpointError like :func:`load_checkpoint`."""
    try:
        obj = load_checkpoint(path, mmap=True)
    except Exception:  # noqa: BLE001 - e.g. a file torch cannot map (legacy serialisation): read it whole
        obj = load_checkpoint(path)  # raises the CheckpointError that says what is wrong
    out = {k: v for k, v in obj.items() if k not in _TENSOR_KEYS}
    out["has_position_stats"] = obj.get("position_stats") is not None
    out["has_training_state"] = "training_state" in obj
    return out
