"""Self-supervised, in-domain pretraining of SP-Mamba's ResNet teacher on normal slices (issue 10, lever 2).

A random ResNet carries no anatomy: its features describe local texture, so the student learns to reproduce them
everywhere and the teacher/student distance barely reacts to a lesion. Before distillation the encoder can learn
from the same normal slices the student is trained on, with one of two pretext tasks, each through a light
convolutional head that reads the encoder's three levels and is thrown away afterwards:

* ``"inpaint"`` (masked image modelling): square patches of side S/16 are blanked (set to 0, the background) in
  ``mask_ratio`` of the grid; the head reconstructs the slice; the loss is the mean squared error on the blanked
  pixels only, so the encoder must infer tissue from its surroundings.
* ``"denoise"`` (coarse-noise denoising, as in denoising autoencoders for brain MRI): Gaussian noise drawn on an
  (S/8 x S/8) grid, upsampled bilinearly to S x S (blob-like, lesion-sized structure, not pixel noise) and
  limited to the slice's foreground, is added; the head restores the clean slice; the loss is the mean squared
  error over the whole slice.

The encoder (BatchNorm in training mode, every parameter learning) and the head are optimised together with
AdamW; then the encoder is frozen again (parameters without gradients, eval mode). Its BatchNorm statistics, which
the pretraining estimated on corrupted inputs, are re-estimated on the clean slices afterwards by the training
loop's encoder-norm phase (``SPMamba.preparation_phase``: "auto" adapts an encoder pretrained in domain), and by
``spmamba pretrain`` before it writes a teacher file.

Shapes: slices (n, 1, S, S) with intensities scaled as the Detector does (normal tissue in [0, 1], background 0);
the encoder takes (B, 3, S, S) ImageNet-normalised inputs (``to_input``) and returns
[(B, 64, S/4, S/4), (B, 128, S/8, S/8), (B, 256, S/16, S/16)].
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OBJECTIVES", "DEFAULT_STEPS", "PretrainHead", "mask_patches", "coarse_noise", "pretrain_encoder",
           "PretrainResult", "teacher_record", "encoder_state_torchvision", "TEACHER_FORMAT", "read_teacher_file"]

OBJECTIVES = ("inpaint", "denoise")
#: steps when neither a number nor a time limit is given (about 4 minutes of a 2-core CPU at the fast preset)
DEFAULT_STEPS = 80
#: tag of the teacher files ``spmamba pretrain`` writes (a torchvision-format ResNet state dict + this record)
TEACHER_FORMAT = "spmamba-teacher"


class PretrainHead(nn.Module):
    """Light decoder from the encoder's levels back to the slice (thrown away after pretraining).

    [(B, c1, S/4, S/4), (B, c2, S/8, S/8), (B, c3, S/16, S/16)] -> (B, 1, S, S): 1x1 lateral convolutions to
    ``width`` channels summed top-down (feature-pyramid style), then two (3x3 convolution, instance norm, PReLU,
    x2 upsampling) stages and a 3x3 convolution to one channel. MONAI ``Convolution`` blocks."""

    def __init__(self, channels: Sequence[int] = (64, 128, 256), width: int = 64):
        super().__init__()
        from monai.networks.blocks import Convolution

        self.lateral = nn.ModuleList(Convolution(2, c, width, kernel_size=1, conv_only=True) for c in channels)
        self.up = nn.Sequential(
            Convolution(2, width, width // 2, kernel_size=3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            Convolution(2, width // 2, width // 4, kernel_size=3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            Convolution(2, width // 4, 1, kernel_size=3, conv_only=True),
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            x = F.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False) + lat(f)
        return self.up(x)


def mask_patches(x: torch.Tensor, patch: int, ratio: float, generator: torch.Generator) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Blank a random ``ratio`` of the (S/patch)^2 square patches of each slice.

    x (B, 1, S, S) -> (masked input (B, 1, S, S) with blanked pixels 0, mask (B, 1, S, S) float, 1 = blanked)."""
    b, _, h, w = x.shape
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    grid = (torch.rand(b, 1, gh, gw, generator=generator) < ratio).to(x.dtype)
    mask = F.interpolate(grid, scale_factor=patch, mode="nearest")[..., :h, :w].to(x.device)
    return x * (1 - mask), mask


def coarse_noise(x: torch.Tensor, sigma: float, cells: int, generator: torch.Generator) -> torch.Tensor:
    """x (B, 1, S, S) + Gaussian noise (std ``sigma``) drawn on a (cells x cells) grid, upsampled bilinearly to
    S x S and kept to the foreground (x > 0) -> (B, 1, S, S)."""
    b, _, h, w = x.shape
    n = torch.randn(b, 1, cells, cells, generator=generator) * sigma
    n = F.interpolate(n, size=(h, w), mode="bilinear", align_corners=False).to(x.device)
    return x + n * (x > 0).to(x.dtype)


@dataclass
class PretrainResult:
    """What ``pretrain_encoder`` did: objective, optimisation steps, wall seconds, slices seen (steps x batch),
    why it ended (None = all steps, "stopped", "time_limit") and the loss per step."""
    objective: str
    steps: int = 0
    planned_steps: int = 0
    seconds: float = 0.0
    slices_seen: int = 0
    stop_reason: Optional[str] = None
    losses: list = field(default_factory=list)

    def record(self) -> dict:
        """The part a model or teacher file keeps (plain values)."""
        tail = self.losses[-10:]
        return {"objective": self.objective, "steps": self.steps, "planned_steps": self.planned_steps,
                "seconds": round(self.seconds, 2), "slices_seen": self.slices_seen, "stop_reason": self.stop_reason,
                "first_loss": self.losses[0] if self.losses else None,
                "final_loss": float(sum(tail) / len(tail)) if tail else None}


class _Trainable:
    """Context: the frozen encoder learns (parameters with gradients, BatchNorm on batch statistics with running
    averages updated); frozen again (no gradients, eval mode) on exit, whatever happened."""

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder

    def __enter__(self) -> nn.Module:
        for p in self.encoder.parameters():
            p.requires_grad_(True)
        for m in self.encoder.modules():  # ResNetEncoder.train() always means eval: set the flags directly
            m.training = True
        return self.encoder

    def __exit__(self, *exc) -> None:
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        for m in self.encoder.modules():
            m.training = False


def pretrain_encoder(encoder: nn.Module, to_input: Callable[[torch.Tensor], torch.Tensor], slices: torch.Tensor,
                     objective: str, *, steps: int = DEFAULT_STEPS, batch_size: int = 16, lr: float = 1e-3,
                     weight_decay: float = 1e-4, grad_clip: float = 5.0, seed: int = 0,
                     mask_ratio: float = 0.4, noise_sigma: float = 0.2,
                     deadline: Optional[float] = None, should_stop: Optional[Callable[[], bool]] = None,
                     progress: Optional[Callable[[dict], None]] = None) -> PretrainResult:
    """Pretrain ``encoder`` in place on normal ``slices`` (n, 1, S, S) with ``objective`` ("inpaint" | "denoise").

    ``to_input``: (B, 1, S, S) grey -> (B, 3, S, S) encoder input (``SPMamba._encoder_input``); the encoder
    returns its three levels (see the module docstring). Every step draws ``batch_size`` random slices (a seeded
    permutation, epoch after epoch), corrupts them, and takes one AdamW step (lr, weight decay, gradient norm
    clipped at ``grad_clip``) on encoder and head. ``should_stop()`` and ``deadline`` (a ``time.time()`` value;
    a step is not started when the last one would end after it) are checked before every step, the first
    included, so a stop can leave the encoder untouched (``steps == 0``). ``progress`` receives
    ``{"phase": "pretrain", "step", "total_steps", "unit": "step", "loss"}`` (step 0 first). The encoder is
    frozen again on return (also on errors); the head is discarded."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown pretraining objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if steps < 0:
        raise ValueError("steps must be >= 0")
    n, _, size, _ = slices.shape
    dev = next(encoder.parameters()).device
    channels = getattr(encoder, "channels", (64, 128, 256))
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the head's initial weights, seeded; the global RNG is left as it was
        torch.manual_seed(seed)
        head = PretrainHead(channels).to(dev)
    params = list(encoder.parameters()) + list(head.parameters())
    batch = max(1, min(batch_size, n))
    res = PretrainResult(objective=objective, planned_steps=int(steps))
    emit = progress or (lambda _d: None)
    emit({"phase": "pretrain", "step": 0, "total_steps": int(steps), "unit": "step"})
    t0 = time.time()
    step_s = 0.0
    order = torch.randperm(n, generator=g)
    pos = 0
    with _Trainable(encoder):
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        head.train()
        while res.steps < steps:
            if should_stop is not None and should_stop():
                res.stop_reason = "stopped"
                break
            if deadline is not None and time.time() + step_s > deadline:
                res.stop_reason = "time_limit"
                break
            ts = time.perf_counter()
            if pos + batch > n:
                order, pos = torch.randperm(n, generator=g), 0
            x = slices[order[pos:pos + batch]].to(dev)
            pos += batch
            if objective == "inpaint":
                corrupted, mask = mask_patches(x, max(1, size // 16), mask_ratio, g)
            else:
                corrupted, mask = coarse_noise(x, noise_sigma, max(2, size // 8), g), None
            recon = head(encoder(to_input(corrupted)))
            err = (recon - x) ** 2
            loss = (err * mask).sum() / mask.sum().clamp_min(1.0) if mask is not None else err.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            res.steps += 1
            res.slices_seen += int(x.shape[0])
            res.losses.append(float(loss.item()))
            dt = time.perf_counter() - ts
            step_s = dt if res.steps == 1 else max(0.7 * step_s + 0.3 * dt, dt)
            emit({"phase": "pretrain", "step": res.steps, "total_steps": int(steps), "unit": "step",
                  "loss": res.losses[-1]})
    res.seconds = time.time() - t0
    return res


def encoder_state_torchvision(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A ``ResNetEncoder``'s weights under torchvision's names (conv1, bn1, layer1..layer3), as
    ``load_encoder_weights`` reads them back."""
    out = {}
    for k, v in encoder.state_dict().items():
        k = k.replace("stem.0.", "conv1.", 1) if k.startswith("stem.0.") else k
        k = k.replace("stem.1.", "bn1.", 1) if k.startswith("stem.1.") else k
        out[k] = v.detach().cpu().clone()
    return out


def read_teacher_file(path: "str | Path") -> Optional[dict]:
    """The record inside a teacher file written by ``spmamba pretrain`` (``TEACHER_FORMAT``), or None for any
    other weights file (torchvision's, ImageNet ...) or one that cannot be read (loading it reports that)."""
    try:
        obj = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - load_encoder_weights gives the error message
        return None
    if isinstance(obj, dict) and obj.get("format") == TEACHER_FORMAT and isinstance(obj.get("teacher"), dict):
        return dict(obj["teacher"])
    return None


def teacher_record(encoder_weights: Optional[str]) -> dict:
    """Where a new model's teacher comes from, before any in-domain pretraining: ``{"source": "random"}``,
    ``{"source": "imagenet"}`` or ``{"source": "file", "file", "digest"}`` plus, for a teacher file of
    ``spmamba pretrain``, its own record (objective, steps, seconds, slices seen ...) under ``"pretraining"``."""
    if encoder_weights in (None, "", "none", "random"):
        return {"source": "random"}
    if encoder_weights == "imagenet":
        return {"source": "imagenet"}
    from .encoder import file_digest

    path = Path(encoder_weights).expanduser()
    rec = {"source": "file", "file": str(path), "digest": file_digest(path) if path.is_file() else None}
    inner = read_teacher_file(path)
    if inner is not None:
        rec["pretraining"] = inner
        for k in ("objective", "steps", "seconds", "slices_seen"):
            if k in inner:
                rec[k] = inner[k]
    return rec
