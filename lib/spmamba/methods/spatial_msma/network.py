"""The pieces of Spatial-MSMA (``spmamba.methods.spatial_msma``): the variance-exploding noise schedule, the
noise-conditioned 3-D residual U-Net score network and its denoising-score-matching loss, the pooled multiscale
score-norm features, the sinusoidal 3-D position encoding and the conditional normalising flow (``normflows``)."""
from __future__ import annotations

import math
from typing import Sequence

import normflows as nf
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

__all__ = ["sigma_schedule", "sigma_at", "dsm_loss", "ScoreUNet", "pooled_score_norms", "position_encoding",
           "build_flow", "largest_pairwise_distance"]


# ------------------------------------------------------------------------------------------------ noise schedule
def sigma_schedule(sigma_min: float, sigma_max: float, levels: int) -> torch.Tensor:
    """The ``levels`` noise scales of the features: geometric from ``sigma_max`` down to ``sigma_min`` (both
    included), as NCSN / the VE SDE's discretisation. -> (levels,) float32, decreasing."""
    if levels == 1:
        return torch.tensor([float(sigma_min)])
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), levels))


def sigma_at(t: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The VE SDE's noise scale at time ``t`` in [0, 1]: sigma_min (sigma_max / sigma_min) ** t."""
    return sigma_min * (sigma_max / sigma_min) ** t


def largest_pairwise_distance(volumes: torch.Tensor) -> float:
    """max_ij ||x_i - x_j|| over the (n, ...) volumes: Song & Ermon's (2020) choice of sigma_max."""
    flat = volumes.reshape(volumes.shape[0], -1).double()
    return float(torch.cdist(flat, flat).max()) if len(flat) > 1 else 0.0


def dsm_loss(score_fn, x: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Denoising score matching under the VE SDE (Song et al. 2021, ``reduce_mean``): the mean over the batch of
    the mean over voxels of (sigma s(x + sigma z, sigma) + z)^2. ``x``, ``z``: (B, C, D, H, W); ``sigma``: (B,)."""
    s = sigma.view(-1, *([1] * (x.dim() - 1)))
    score = score_fn(x + s * z, sigma)
    return ((score * s + z) ** 2).flatten(1).mean(1).mean()


# ------------------------------------------------------------------------------------------------ score network
class FiLMResBlock(nn.Module):
    """A BigGAN-style residual block (NCSN++'s ResnetBlockBigGAN without resampling): GroupNorm, SiLU, conv;
    GroupNorm modulated by the noise embedding (FiLM: x (1 + scale) + shift), SiLU, conv; skip (1x1x1 conv when the
    channels change); sum / sqrt(2). (B, cin, D, H, W), (B, E) -> (B, cout, D, H, W)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # starts as the skip path
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return (self.skip(x) + h) / math.sqrt(2.0)


class ScoreUNet(nn.Module):
    """Noise-conditioned 3-D residual U-Net: s(x, sigma) ~ grad_x log p_sigma(x).

    ``channels[i]`` feature maps at level i (the grid halved between levels), ``blocks`` FiLM residual blocks per
    level on the way down and up, skip connections by concatenation. The noise level enters as MONAI's sinusoidal
    embedding of log(sigma) through a 2-layer MLP, applied to every block as FiLM; the output is divided by sigma
    (NCSN++'s ``scale_by_sigma``). (B, C, D, H, W) with D, H, W divisible by 2 ** (len(channels) - 1), (B,) ->
    (B, C, D, H, W)."""

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64), blocks: int = 1,
                 groups: int = 8, emb_dim: int = 64):
        super().__init__()
        self.emb_dim = emb_dim
        self.embed = nn.Sequential(nn.Linear(emb_dim, 4 * emb_dim), nn.SiLU(), nn.Linear(4 * emb_dim, 4 * emb_dim))
        e = 4 * emb_dim
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        cin = channels[0]
        for i, c in enumerate(channels):
            self.down.append(nn.ModuleList(FiLMResBlock(cin if b == 0 else c, c, e, groups) for b in range(blocks)))
            cin = c
            self.downsample.append(nn.Conv3d(c, c, 3, stride=2, padding=1) if i < len(channels) - 1 else nn.Identity())
        self.mid = FiLMResBlock(cin, cin, e, groups)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(channels))):
            c = channels[i]
            self.up.append(nn.ModuleList(FiLMResBlock((cin + c) if b == 0 else c, c, e, groups)
                                         for b in range(blocks)))
            cin = c
            self.upsample.append(nn.Conv3d(c, channels[i - 1], 3, padding=1) if i > 0 else nn.Identity())
            if i > 0:
                cin = channels[i - 1]
        self.norm_out = nn.GroupNorm(min(groups, channels[0]), channels[0])
        self.conv_out = nn.Conv3d(channels[0], in_channels, 3, padding=1)
        self.levels = len(channels)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0])
        emb = self.embed(get_timestep_embedding(torch.log(sigma), self.emb_dim).to(x.dtype))
        h = self.conv_in(x)
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for blk in blocks:
                h = blk(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for blocks, up in zip(self.up, self.upsample):
            h = torch.cat([h, skips.pop()], dim=1)
            for blk in blocks:
                h = blk(h, emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out / sigma.view(-1, 1, 1, 1, 1)


# ------------------------------------------------------------------------------------------------ features
def pooled_score_norms(scores: torch.Tensor) -> torch.Tensor:
    """Spatial-MSMA's local feature: per voxel and noise level, the L2 norm of the scores in the 3 x 3 x 3
    neighbourhood (square, sum over channels and neighbours, square root; zero padding at the border).
    (B, L, C, D, H, W) scores at L levels -> (B, L, D, H, W)."""
    B, L, C, D, H, W = scores.shape
    sq = (scores ** 2).sum(2).reshape(B * L, 1, D, H, W)
    summed = F.conv3d(sq, torch.ones(1, 1, 3, 3, 3, dtype=sq.dtype, device=sq.device), padding=1)
    return summed.clamp_min(0).sqrt().reshape(B, L, D, H, W)


def position_encoding(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal 3-D position encoding (the transformer's, per axis): ``dim`` channels split into three equal
    parts (dim divisible by 6), each axis's coordinate (voxels) encoded as sin/cos at geometric frequencies
    1 / 10000 ** (2k / part). (N, 3) -> (N, dim)."""
    part = dim // 3
    inv_freq = 1.0 / (10000 ** (torch.arange(0, part, 2, dtype=torch.float32, device=coords.device) / part))
    out = []
    for axis in range(3):
        angle = coords[:, axis:axis + 1].float() * inv_freq
        out.append(torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1))  # interleaved sin, cos
    return torch.cat(out, dim=1)


def build_flow(features: int, context: int, hidden: int, blocks: int) -> nf.ConditionalNormalizingFlow:
    """The public code's conditional flow head, with ``normflows``: a masked affine autoregressive flow, then
    ``blocks`` x (LU-decomposed linear permutation, coupled rational-quadratic spline), each network conditioned on
    the ``context`` vector; standard normal base; the last linear layer of the flow zero-initialised (as the
    public code). Density: ``flow.log_prob(x (N, features), context (N, context))`` -> (N,)."""
    layers = [nf.flows.MaskedAffineAutoregressive(features, hidden_features=hidden, num_blocks=2,
                                                  context_features=context)]
    for _ in range(blocks):
        layers += [nf.flows.LULinearPermute(features),
                   nf.flows.CoupledRationalQuadraticSpline(features, 2, hidden, num_context_channels=context,
                                                           num_bins=8)]
    flow = nf.ConditionalNormalizingFlow(q0=nf.distributions.DiagGaussian(features, trainable=False),
                                         flows=layers[::-1])  # normflows applies them in reverse order
    linears = [m for m in flow.modules() if isinstance(m, nn.Linear)]
    for i, m in enumerate(linears):
        if i == len(linears) - 1:
            nn.init.zeros_(m.weight)
        else:
            nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    return flow
