"""SP-Mamba: frozen ResNet teacher -> fusion bottleneck -> window-sliding prototypes + Mamba decoder student."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.base import SliceModel
from .anomaly_maps import feature_distance_map, gaussian_blur, image_score
from .bottleneck import FusionBottleneck
from .cnn_decoder import CNNDecoder
from .config import PRESETS, SPMambaConfig, get_config
from .encoder import IMAGENET_MEAN, IMAGENET_STD, ResNetEncoder
from .mamba_decoder import MambaDecoder
from .pretrain import DEFAULT_STEPS, OBJECTIVES, pretrain_encoder, teacher_record
from .prototypes import PrototypeBank

__all__ = ["SPMamba", "SPMambaOutput", "TeacherFeatures", "TeacherFeatureCache"]

log = logging.getLogger(__name__)

# the teacher-feature cache is used only when it takes at most this share of the memory available, and this much
_CACHE_MAX_BYTES = 4 << 30
_CACHE_MAX_SHARE = 0.3


class TeacherFeatures(NamedTuple):
    """A training batch with its frozen teacher's features: ``x`` (B, 1, S, S), ``enc`` the three encoder levels
    [(B, 64, S/4, S/4), (B, 128, S/8, S/8), (B, 256, S/16, S/16)]."""

    x: torch.Tensor
    enc: list

    def to(self, device: Any, non_blocking: bool = False) -> "TeacherFeatures":
        return TeacherFeatures(self.x.to(device, non_blocking=non_blocking),
                               [f.to(device, non_blocking=non_blocking) for f in self.enc])


class TeacherFeatureCache:
    """The training slices (n, 1, S, S) with the frozen teacher's features computed once.

    Exact, not an approximation: the teacher never changes during distillation (frozen weights, BatchNorm in eval
    mode) and the slices are not augmented, so a step reads what it would have computed. ``cache[idx]`` ->
    :class:`TeacherFeatures`. At the fast preset (128 px) a slice's features take 459 KB (~0.5 GB for 1,200 slices)."""

    def __init__(self, x: torch.Tensor, enc: list):
        self.x, self.enc = x, enc

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, idx: Any) -> TeacherFeatures:
        return TeacherFeatures(self.x[idx], [f[idx] for f in self.enc])

    @staticmethod
    def nbytes_per_slice(image_size: int) -> int:
        s = image_size
        return 4 * (64 * (s // 4) ** 2 + 128 * (s // 8) ** 2 + 256 * (s // 16) ** 2)


@dataclass
class SPMambaOutput:
    enc: list[torch.Tensor]  # encoder levels [(B,64,S/4,S/4), (B,128,S/8,S/8), (B,256,S/16,S/16)]
    dec: list[torch.Tensor]  # decoder levels, same shapes
    proto_distance: Optional[torch.Tensor]  # (B, S/32, S/32) window-sliding prototype distance, or None


class SPMamba(SliceModel):
    """Input: grey slices (B, 1, S, S) with intensities scaled to [0, 1] (normal tissue; lesions may exceed 1).

    The method "spmamba" of the registry (``spmamba.methods``): a SliceModel."""

    method = "spmamba"
    PRESETS = PRESETS
    default_preset = "fast"
    PRETRAIN_OBJECTIVES = OBJECTIVES

    @classmethod
    def get_config(cls, spec: Any, **overrides: Any) -> SPMambaConfig:
        return get_config(spec, **overrides)

    @classmethod
    def build(cls, config: Any, encoder_weights: str = "none") -> "SPMamba":
        return cls(config, encoder_weights=encoder_weights)

    def __init__(self, config: "SPMambaConfig | str" = "paper", encoder_weights: str = "none"):
        super().__init__()
        self.config = cfg = get_config(config)
        self.pretrained_in_domain = False  # set by ``pretrain``: the encoder learnt from the normals (not saved)
        self.encoder = ResNetEncoder(cfg.encoder, encoder_weights)
        self.bottleneck = FusionBottleneck(ResNetEncoder.channels)
        s = cfg.bottleneck_size
        self.prototypes = (PrototypeBank(s, cfg.n_prototypes, cfg.decoder_dims[0], cfg.prototype_window)
                           if cfg.use_prototypes else None)
        if cfg.decoder == "cnn":
            self.decoder: nn.Module = CNNDecoder(cfg.decoder_dims)
        else:
            self.decoder = MambaDecoder(
                s, cfg.decoder_dims, cfg.decoder_depths, cfg.drop_path,
                scan=cfg.scan, n_directions=cfg.n_directions, d_state=cfg.d_state, expand=cfg.ssm_expand,
            )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) grey -> (B, 3, S, S) ImageNet-normalised."""
        return (x.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std

    def adapt_encoder_norm(self, slices: torch.Tensor, batch_size: int = 64,
                           progress: Optional[Callable[[int, int], None]] = None,
                           should_stop: Optional[Callable[[], bool]] = None) -> int:
        """Re-estimate the frozen encoder's BatchNorm statistics on normal slices (B, 1, S, S); see
        ``ResNetEncoder.adapt_batchnorm``. Returns the number of slices used.

        ``progress(batches_done, n_batches)`` is called after every batch; ``should_stop()`` is polled before every
        batch but the first, and True ends the estimate with the batches seen so far (give the slices in a random
        order when it may stop early, so those batches are a fair sample)."""
        dev = self.pixel_mean.device
        starts = list(range(0, slices.shape[0], batch_size))

        def batches():
            for b, i in enumerate(starts):
                if b > 0 and should_stop is not None and should_stop():
                    return
                yield self._encoder_input(slices[i:i + batch_size].to(dev))
                if progress is not None:
                    progress(b + 1, len(starts))

        return self.encoder.adapt_batchnorm(batches())

    def teacher_record(self, encoder_weights: str) -> dict:
        """Source of the encoder's weights (``models.pretrain.teacher_record``)."""
        return teacher_record(encoder_weights)

    def pretrain(self, data: torch.Tensor, objective: str, *, steps: Optional[int] = None, seed: int = 0,
                 deadline: Optional[float] = None, should_stop: Optional[Callable[[], bool]] = None,
                 progress: Optional[Callable[[dict], None]] = None, encoder_weights: str = "none") -> dict:
        """In-domain self-supervised pretraining of the encoder on training slices (n, 1, S, S)
        (``models.pretrain.pretrain_encoder``: "inpaint" or "denoise"), batch size and weight decay of the
        preset, lr 1e-3, ``steps`` (default ``DEFAULT_STEPS``). Returns the teacher record: ``source``
        "in-domain" (or, when stopped before its first step, the source of the weights it started from), ``init``
        (what it started from), ``objective``, ``steps``, ``planned_steps``, ``seconds``, ``slices_seen``,
        ``stop_reason``, first and final loss."""
        ts = self.config.training
        steps = DEFAULT_STEPS if steps is None else int(steps)
        res = pretrain_encoder(self.encoder, self._encoder_input, data, objective, steps=steps,
                               batch_size=ts.batch_size, weight_decay=ts.weight_decay, grad_clip=ts.grad_clip,
                               seed=seed, deadline=deadline, should_stop=should_stop, progress=progress)
        start = teacher_record(encoder_weights)
        self.pretrained_in_domain = res.steps > 0
        if not self.pretrained_in_domain:
            return {**start, "pretraining": res.record()}
        return {"source": "in-domain", "init": start, **res.record()}

    def preparation_phase(self, encoder_weights: str) -> Optional[str]:
        """"encoder_norm" when the encoder's BatchNorm statistics are re-estimated before training
        (``SPMambaConfig.encoder_norm``: "auto" adapts random encoders and encoders just pretrained in domain,
        whose running statistics were gathered on corrupted slices, and keeps other pretrained ones)."""
        setting = self.config.encoder_norm
        random = encoder_weights in (None, "", "none", "random") or self.pretrained_in_domain
        return "encoder_norm" if (setting == "adapt" or (setting == "auto" and random)) else None

    def prepare(self, data: torch.Tensor, progress: Optional[Callable[[int, int], None]] = None,
                should_stop: Optional[Callable[[], bool]] = None) -> str:
        """The encoder norm adaptation on training slices (n, 1, S, S), 64 a batch; returns what was done."""
        n = int(data.shape[0])
        if progress is not None:
            progress(0, -(-n // 64))
        with torch.no_grad():
            seen = self.adapt_encoder_norm(data, batch_size=64, progress=progress, should_stop=should_stop)
        return f"adapted on {seen} training slices" + (f" (of {n}; time limit)" if seen < n else "")

    def training_samples(self, data: torch.Tensor, planned_samples: int,
                         progress: Optional[Callable[[int, int], None]] = None,
                         should_stop: Optional[Callable[[], bool]] = None) -> Union[torch.Tensor, TeacherFeatureCache]:
        """The slices with their teacher features computed once (``TeacherFeatureCache``; the encoder forward is
        ~10% of a fast-preset step), when the planned steps draw every slice at least once (otherwise the pass
        costs more than it saves) and the features fit in memory; else ``data`` itself. A stop request during the
        pass abandons the cache. Progress phase: batches of 64."""
        n = int(data.shape[0])
        need = n * TeacherFeatureCache.nbytes_per_slice(self.config.image_size)
        if planned_samples < n:
            return data
        try:
            import psutil

            available = psutil.virtual_memory().available
        except Exception:  # psutil missing: assume little
            available = 2 * need
        if need > min(_CACHE_MAX_BYTES, _CACHE_MAX_SHARE * available):
            log.info("teacher features not cached: %.1f GB for %d slices (%.1f GB available)", need / 2 ** 30, n,
                     available / 2 ** 30)
            return data
        dev = self.pixel_mean.device
        starts = list(range(0, n, 64))
        enc: list = [[] for _ in ResNetEncoder.channels]
        if progress is not None:  # announced before the work starts (a progress bar opens at step 0)
            progress(0, len(starts))
        with torch.no_grad():
            for b, i in enumerate(starts):
                if should_stop is not None and should_stop():
                    return data
                for level, f in zip(enc, self.encoder(self._encoder_input(data[i:i + 64].to(dev)))):
                    level.append(f.to(data.device))
                if progress is not None:
                    progress(b + 1, len(starts))
        return TeacherFeatureCache(data, [torch.cat(level) for level in enc])

    def training_loss(self, batch: Union[torch.Tensor, TeacherFeatures]) -> torch.Tensor:
        if isinstance(batch, TeacherFeatures):
            return self.loss(self(batch.x, enc=batch.enc))
        return self.loss(self(batch))

    def score_slices(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 1, S, S) -> (anomaly maps (n, S, S), image scores (n,))."""
        maps = self.anomaly_map(self(batch))
        return maps, self.image_score(maps)

    def forward(self, x: torch.Tensor, enc: Optional[list] = None) -> SPMambaOutput:
        """``enc``: the teacher's features of ``x`` when already computed (``TeacherFeatureCache``)."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"SPMamba expects (B, 1, S, S) grey slices, got {tuple(x.shape)}")
        if enc is None:
            with torch.no_grad():
                enc = [f.detach() for f in self.encoder(self._encoder_input(x))]
        z = self.bottleneck(enc)  # (B, 512, s, s)
        proto_d = self.prototypes(z.permute(0, 2, 3, 1)) if self.prototypes is not None else None
        dec = self.decoder(z)
        return SPMambaOutput(enc, dec, proto_d)

    def _proto_up(self, out: SPMambaOutput) -> Optional[torch.Tensor]:
        if out.proto_distance is None:
            return None
        S = self.config.image_size
        return F.interpolate(out.proto_distance.unsqueeze(1), size=(S, S), mode="bilinear", align_corners=False).squeeze(1)

    def loss(self, out: SPMambaOutput) -> torch.Tensor:
        """sum over levels of mse_weight * MSE(f_enc, f_dec) + prototype_weight * mean(d_upsampled)."""
        cfg = self.config
        loss = sum(cfg.mse_weight * F.mse_loss(fd, fe) for fe, fd in zip(out.enc, out.dec))
        d_up = self._proto_up(out)
        if d_up is not None:
            loss = loss + cfg.prototype_weight * d_up.mean()
        return loss

    def anomaly_map(self, out: SPMambaOutput) -> torch.Tensor:
        """A = blur(mean_levels(1 - cos) weighted by map_level_weights, sigma) + map_prototype_weight * d_up.
        -> (B, S, S)."""
        cfg = self.config
        a = gaussian_blur(feature_distance_map(out.enc, out.dec, cfg.image_size, cfg.map_level_weights),
                          cfg.map_blur_sigma)
        d_up = self._proto_up(out)
        if d_up is not None:
            a = a + cfg.map_prototype_weight * d_up
        return a

    def image_score(self, maps: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return image_score(maps, cfg.score_beta, cfg.score_gamma, cfg.use_score_terms)
