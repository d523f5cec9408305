"""MemMC-MAE as a method ("memmc_mae"): a memory-augmented multi-level cross-attentional masked autoencoder
(Tian et al., "Unsupervised anomaly detection in medical images with a memory-augmented multi-level
cross-attentional masked autoencoder", arXiv 2203.11725, MLMI 2023), a 2-D slice model.

What the paper says (abstract and method overview; no public code): a transformer masked autoencoder trained on
normal images only; it masks large parts of the input image and reconstructs them; its encoder uses a
memory-augmented self-attention operator (learnable memory storing normal patterns), its decoder a multi-level
cross-attention operator (attending to several encoder levels); an anomaly is what the model fails to
reconstruct, so the anomaly map and score come from the reconstruction error. Reported on colonoscopy (Hyper-Kvasir),
pneumonia and COVID-19 chest X-ray.

What this implementation chose where the paper is silent (closest to its words and to the conventions it builds on,
MAE (He et al. 2022) and the Meshed-Memory Transformer (M2, Cornia et al. 2020)); docs/METHODS.md lists them too:

* Encoder: MAE's ViT on the visible patches only (MONAI's ``PatchEmbeddingBlock``: conv patch embedding, fixed 2-D
  sin-cos positions; no class token), pre-norm layers whose self-attention is M2's memory-augmented attention
  (``blocks.MemorySABlock``: ``memory_slots`` learnable keys and values appended to every layer's keys and values,
  40 in the ``paper`` preset as in M2).
* Decoder: MAE's lightweight decoder (encoder tokens projected to ``decoder_dim``, a shared mask token at the
  hidden positions, fixed sin-cos positions, pre-norm layers, linear head to the patch pixels), each layer with M2's
  meshed cross-attention (``blocks.MultiLevelCrossAttention``: one cross-attention shared by the levels, a sigmoid
  gate per level, sum / sqrt(L)) to ``decoder_levels`` encoder levels: the outputs of evenly spaced encoder layers,
  the last one always among them, each with its own LayerNorm.
* Training: MAE's per-image random masking at ``mask_ratio`` 0.75; loss = mean squared error over the hidden
  patches only, on the scaled intensities themselves (MAE's per-patch normalised targets would erase the intensity
  differences that make most lesions: the map must be in intensity units). No augmentation (as the product's other
  methods). Optimiser: the product's shared loop (AdamW, lr x0.1 at 80%, gradient clipping); lr and weight decay
  per preset.
* Test time: deterministic complementary masks. A round splits the patches, in a seeded random order (random like
  the training masks, the same for every image), into K = round(1 / (1 - mask_ratio)) groups of equal size (+-1);
  mask k shows group k and hides the rest, so every patch is visible in exactly one mask of the round and hidden
  (reconstructed) in the other K - 1. A pixel's error is the squared (``map_error``) difference between the input
  and the reconstruction, averaged over the masks that hid it (``test_rounds`` rounds with different orders:
  averaged too). The map is blurred with a Gaussian of ``map_blur_sigma`` pixels (patch edges), the slice score
  is its maximum. The Detector then smooths in 3-D, normalises per position (aligned models) and calibrates, as
  for every slice method.

Input: (B, 1, S, S) slices with intensities scaled to [0, 1] for normal tissue (``Preprocessing``), S =
``image_size``; grey images (colour ones are read as grey by ``spmamba.io``).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
from monai.networks.blocks import PatchEmbeddingBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.layers import trunc_normal_

from ...models.anomaly_maps import gaussian_blur
from ..base import MethodConfig, SliceModel, TrainingSettings
from .blocks import EncoderLayer, MemorySABlock, MultiLevelCrossAttention, decoder_layer

__all__ = ["MemMCMAEConfig", "MemMCMAE", "PRESETS", "complementary_masks", "MemorySABlock",
           "MultiLevelCrossAttention"]

MAP_ERRORS = ("squared", "absolute")


@dataclass(frozen=True)
class MemMCMAEConfig(MethodConfig):
    """Architecture, masking and scoring of a MemMC-MAE model; ``training`` says how it is optimised."""

    name: str = "paper"
    image_size: int = 224
    patch_size: int = 16
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    # learnable memory slots per encoder layer (0: plain self-attention, the ablation "no memory")
    memory_slots: int = 40
    # encoder levels every decoder layer attends to (evenly spaced layers, the last included; 1: the last only,
    # plain cross-attention, the ablation "single level")
    decoder_levels: int = 4
    mask_ratio: float = 0.75
    test_rounds: int = 1  # rounds of complementary masks at test time
    map_error: str = "squared"  # squared | absolute difference between input and reconstruction
    map_blur_sigma: float = 2.0  # pixels at image_size
    training: TrainingSettings = field(default_factory=lambda: TrainingSettings(
        batch_size=32, base_lr=2.5e-4, weight_decay=0.05, grad_clip=5.0, epochs=400))

    LABEL = "memmc_mae"

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid ** 2

    @property
    def n_visible(self) -> int:
        """Patches a training mask leaves visible: round(N (1 - mask_ratio)), at least one."""
        return max(1, int(round(self.n_patches * (1.0 - self.mask_ratio))))

    @property
    def n_test_masks(self) -> int:
        """Masks per round of complementary test masks: K = round(1 / (1 - mask_ratio))."""
        return max(2, int(round(1.0 / (1.0 - self.mask_ratio))))

    @property
    def level_layers(self) -> list[int]:
        """The encoder layers (0-based) whose outputs the decoder attends to: evenly spaced, the last included."""
        d, n = self.encoder_depth, self.decoder_levels
        return sorted({int(round((i + 1) * d / n)) - 1 for i in range(n)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if self.image_size < 8 or self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"memmc_mae: image_size {self.image_size} must be a multiple of patch_size "
                             f"{self.patch_size}")
        if self.n_patches < 4:
            raise ValueError("memmc_mae: at least 2 x 2 patches are needed")
        for dim, heads, what in ((self.encoder_dim, self.encoder_heads, "encoder"),
                                 (self.decoder_dim, self.decoder_heads, "decoder")):
            if heads < 1 or dim % heads or dim % 4:
                raise ValueError(f"memmc_mae: {what}_dim {dim} must be a multiple of 4 (2-D sin-cos positions) "
                                 f"and of {what}_heads {heads}")
        if self.encoder_depth < 1 or self.decoder_depth < 1:
            raise ValueError("memmc_mae: encoder_depth and decoder_depth must be >= 1")
        if not 1 <= self.decoder_levels <= self.encoder_depth:
            raise ValueError(f"memmc_mae: decoder_levels must be 1..encoder_depth ({self.encoder_depth}), got "
                             f"{self.decoder_levels}")
        if self.memory_slots < 0:
            raise ValueError("memmc_mae: memory_slots must be >= 0")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"memmc_mae: mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.n_visible >= self.n_patches:
            raise ValueError(f"memmc_mae: mask_ratio {self.mask_ratio} hides none of the {self.n_patches} patches")
        k = self.n_test_masks
        if self.n_patches < k:
            raise ValueError(f"memmc_mae: {self.n_patches} patches cannot fill {k} complementary test masks")
        if self.test_rounds < 1:
            raise ValueError("memmc_mae: test_rounds must be >= 1")
        if self.map_error not in MAP_ERRORS:
            raise ValueError(f"memmc_mae: map_error must be one of {', '.join(MAP_ERRORS)}, got {self.map_error!r}")
        if self.map_blur_sigma < 0 or self.mlp_ratio <= 0:
            raise ValueError("memmc_mae: map_blur_sigma must be >= 0 and mlp_ratio > 0")


PRESETS: dict[str, MemMCMAEConfig] = {
    # ViT-B-like at 224 px (MAE's ViT-B/16 encoder and 8 x 512 decoder), for a GPU: 196 patches of 16 x 16.
    "paper": MemMCMAEConfig(),
    # For a CPU workstation: 128 px in 8 x 8 patches (256 patches; a patch is 16 mm on a 2 mm brain slice of
    # 256 mm), a narrow, shallow encoder and decoder; every decoder layer attends to all 4 encoder levels.
    "fast": MemMCMAEConfig(
        name="fast", image_size=128, patch_size=8, encoder_dim=128, encoder_depth=4, encoder_heads=4,
        decoder_dim=128, decoder_depth=2, decoder_heads=4, memory_slots=20, decoder_levels=4, map_blur_sigma=2.0,
        training=TrainingSettings(batch_size=16, base_lr=1e-3, weight_decay=0.05, grad_clip=5.0, epochs=40)),
    # For tests only: a fraction of a second per step.
    "tiny": MemMCMAEConfig(
        name="tiny", image_size=32, patch_size=8, encoder_dim=16, encoder_depth=2, encoder_heads=2,
        decoder_dim=16, decoder_depth=1, decoder_heads=2, mlp_ratio=2.0, memory_slots=4, decoder_levels=2,
        map_blur_sigma=1.0, training=TrainingSettings(batch_size=4, base_lr=1e-3, weight_decay=0.05, epochs=2)),
}


def complementary_masks(n_patches: int, n_masks: int, round_index: int = 0) -> list[torch.Tensor]:
    """The visible patches of one round of complementary test masks: ``n_masks`` index tensors that split
    ``range(n_patches)`` (each patch in exactly one), sizes differing by at most 1. The order is a seeded random
    permutation (seed ``round_index``): deterministic, and spread like MAE's random training masks."""
    order = torch.randperm(n_patches, generator=torch.Generator().manual_seed(int(round_index)))
    return [torch.sort(group).values for group in torch.tensor_split(order, n_masks)]


class MemMCMAE(SliceModel):
    """The method "memmc_mae" of the registry (``spmamba.methods``); see the module docstring.

    ``forward(x (B, 1, S, S), visible (B, n_vis) patch indices)`` -> reconstruction of every patch (B, N, p*p)."""

    method: ClassVar[str] = "memmc_mae"
    PRESETS: ClassVar[Mapping[str, MemMCMAEConfig]] = PRESETS
    default_preset: ClassVar[str] = "fast"
    config_class: ClassVar[type] = MemMCMAEConfig

    def __init__(self, config: Any = "fast"):
        super().__init__()
        self.config = cfg = self.get_config(config)
        p, e, d = cfg.patch_size, cfg.encoder_dim, cfg.decoder_dim
        with warnings.catch_warnings():  # MONAI's sin-cos positions call torch.meshgrid without indexing= (= "ij")
            warnings.filterwarnings("ignore", message=".*torch.meshgrid.*")
            self.patch_embed = PatchEmbeddingBlock(in_channels=1, img_size=cfg.image_size, patch_size=p,
                                                   hidden_size=e, num_heads=cfg.encoder_heads, proj_type="conv",
                                                   pos_embed_type="sincos", spatial_dims=2)
            self.decoder_pos = build_sincos_position_embedding([cfg.grid, cfg.grid], d, spatial_dims=2)
        self.encoder = nn.ModuleList(EncoderLayer(e, int(e * cfg.mlp_ratio), cfg.encoder_heads, cfg.memory_slots)
                                     for _ in range(cfg.encoder_depth))
        self.level_norms = nn.ModuleList(nn.LayerNorm(e) for _ in cfg.level_layers)
        self.decoder_embed = nn.Linear(e, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        levels = len(cfg.level_layers)
        self.decoder = nn.ModuleList(decoder_layer(d, int(d * cfg.mlp_ratio), cfg.decoder_heads, e, levels)
                                     for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, p * p)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's: truncated-normal (std 0.02) linear weights and mask token, zero biases, unit LayerNorms."""
        trunc_normal_(self.mask_token, mean=0.0, std=0.02, a=-2.0, b=2.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, mean=0.0, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ patches
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, N, p*p), patches in the row-major order of the patch embedding."""
        B, p, g = x.shape[0], self.config.patch_size, self.config.grid
        return x.reshape(B, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(B, g * g, p * p)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p) -> (B, S, S)."""
        B, p, g = patches.shape[0], self.config.patch_size, self.config.grid
        return patches.reshape(B, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(B, g * p, g * p)

    # ------------------------------------------------------------------ network
    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[-1] != self.config.image_size:
            raise ValueError(f"memmc_mae expects (B, 1, {self.config.image_size}, {self.config.image_size}) slices, "
                             f"got {tuple(x.shape)}")
        B, N = x.shape[0], self.config.n_patches
        tokens = self.patch_embed(x)  # (B, N, e), positions added
        gather = visible.unsqueeze(-1)
        h = torch.gather(tokens, 1, gather.expand(-1, -1, tokens.shape[-1]))  # (B, n_vis, e)
        wanted = self.config.level_layers
        levels = []
        for i, layer in enumerate(self.encoder):
            h = layer(h)
            if i in wanted:
                levels.append(self.level_norms[len(levels)](h))
        y = self.mask_token.expand(B, N, -1).clone()
        y = y.scatter(1, gather.expand(-1, -1, y.shape[-1]), self.decoder_embed(levels[-1]))
        y = y + self.decoder_pos
        for layer in self.decoder:
            y = layer(y, context=levels)
        return self.head(self.decoder_norm(y))

    def random_visible(self, batch: int, device: Any) -> torch.Tensor:
        """MAE's random masking: per image, a uniformly random subset of round(N (1 - mask_ratio)) patches stays
        visible (at least one). -> (batch, n_vis) sorted indices."""
        noise = torch.rand(batch, self.config.n_patches, device=device)
        return torch.sort(torch.argsort(noise, dim=1)[:, :self.config.n_visible], dim=1).values

    # ------------------------------------------------------------------ the seam
    def training_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the reconstruction over the hidden patches (B, 1, S, S) -> scalar."""
        visible = self.random_visible(batch.shape[0], batch.device)
        pred = self(batch, visible)
        hidden = torch.ones(pred.shape[:2], device=batch.device).scatter(1, visible, 0.0)  # (B, N)
        err = ((pred - self.patchify(batch)) ** 2).mean(-1)
        return (err * hidden).sum() / hidden.sum()

    def reconstruction_error(self, batch: torch.Tensor) -> torch.Tensor:
        """The per-pixel reconstruction error under the complementary test masks, each pixel averaged over the
        masks that hid it. (B, 1, S, S) -> (B, S, S)."""
        cfg = self.config
        B, N = batch.shape[0], cfg.n_patches
        target = self.patchify(batch)
        total = torch.zeros(B, N, cfg.patch_size ** 2, device=batch.device, dtype=batch.dtype)
        count = torch.zeros(N, device=batch.device, dtype=batch.dtype)
        for r in range(cfg.test_rounds):
            for vis in complementary_masks(N, cfg.n_test_masks, r):
                vis = vis.to(batch.device)
                diff = self(batch, vis.unsqueeze(0).expand(B, -1)) - target
                err = diff ** 2 if cfg.map_error == "squared" else diff.abs()
                hidden = torch.ones(N, device=batch.device, dtype=batch.dtype).index_fill(0, vis, 0.0)
                total += err * hidden.view(1, N, 1)
                count += hidden
        return self.unpatchify(total / count.view(1, N, 1))

    def score_slices(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 1, S, S) -> (anomaly maps (n, S, S): the blurred reconstruction error, slice scores (n,): its max)."""
        maps = gaussian_blur(self.reconstruction_error(batch), self.config.map_blur_sigma)
        return maps, maps.flatten(1).amax(1)
