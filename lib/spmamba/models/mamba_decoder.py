"""SP-Mamba's decoder: SS2D (VMamba-style 2-D selective scan over K directions), VSS layers, LSS blocks
(VSS branch + two local conv branches), PatchExpand, and the 4-stage decoder (MambaAD layout).

Tensors inside the decoder are channels-last: (B, H, W, C).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import DropPath

from ..ops import direction_permutations, selective_scan

__all__ = ["SS2D", "VSSLayer", "LSSBlock", "PatchExpand", "MambaDecoder"]


class SS2D(nn.Module):
    """2-D selective scan over K directions of one scan order.

    in_proj d -> 2*d_inner (x, z); x: depthwise 3x3 conv + SiLU; K scans, each with its own x_proj, dt_proj,
    A_log and D; outputs mapped back to the grid and summed; LayerNorm; * SiLU(z); out_proj d_inner -> d.

    Input/output (B, H, W, d) with H == W == ``size``.
    """

    def __init__(self, d_model: int, size: int, scan: str = "ch", n_directions: int = 8, d_state: int = 16,
                 expand: int = 2, dt_min: float = 0.001, dt_max: float = 0.1, dt_floor: float = 1e-4):
        super().__init__()
        self.d_model, self.size, self.d_state = d_model, size, d_state
        self.d_inner = d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        K = self.n_directions = n_directions
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
        # per-direction projections, stacked: (K, dt_rank + 2N, d_inner) and (K, d_inner, dt_rank)
        self.x_proj_weight = nn.Parameter(torch.empty(K, self.dt_rank + 2 * d_state, d_inner))
        nn.init.uniform_(self.x_proj_weight, -d_inner ** -0.5, d_inner ** -0.5)
        dt_std = self.dt_rank ** -0.5
        self.dt_proj_weight = nn.Parameter(torch.empty(K, d_inner, self.dt_rank).uniform_(-dt_std, dt_std))
        # dt bias so that softplus(bias) is log-uniform in [dt_min, dt_max] (Mamba's initialisation)
        dt = torch.exp(torch.rand(K, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_proj_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real initialisation A = -(1..N), one copy per direction and channel
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(K * d_inner, 1))
        self.D = nn.Parameter(torch.ones(K * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        # small maps (2x2) have no Circular-Hilbert order: fall back to Hilbert there
        scan_name = scan if (scan != "ch" or size >= 4) else "hilbert"
        perms, invs = direction_permutations(scan_name, size, n_directions)
        self.scan_name = scan_name
        self.register_buffer("perms", perms, persistent=False)
        self.register_buffer("inverses", invs, persistent=False)

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, d_inner, H, W) -> y (B, d_inner, L) summed over the K directions, on the grid order."""
        B, D, H, W = x.shape
        L, K, N = H * W, self.n_directions, self.d_state
        flat = x.reshape(B, D, L)
        xs = flat[:, :, self.perms].permute(0, 2, 1, 3)  # (B, K, D, L): direction k visits perms[k]
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_proj_weight)
        A = -torch.exp(self.A_log.float())
        ys = selective_scan(
            xs.reshape(B, K * D, L), dts.reshape(B, K * D, L), A, Bs.contiguous(), Cs.contiguous(),
            self.D.float(), delta_bias=self.dt_proj_bias.reshape(-1).float(), delta_softplus=True,
        ).view(B, K, D, L)
        # back to grid order: y_grid[..., p] = ys[..., inverse[p]]; then sum over directions
        idx = self.inverses.unsqueeze(1).expand(K, D, L).unsqueeze(0).expand(B, K, D, L)
        return torch.gather(ys, 3, idx).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        xz = self.in_proj(x)
        xi, z = xz.chunk(2, dim=-1)
        xi = F.silu(self.conv2d(xi.permute(0, 3, 1, 2).contiguous()))
        y = self.forward_core(xi)  # (B, d_inner, L)
        y = self.out_norm(y.transpose(1, 2).reshape(B, H, W, self.d_inner))
        return self.out_proj(y * F.silu(z))


class VSSLayer(nn.Module):
    """x + DropPath(SS2D(LayerNorm(x))). (B, H, W, d) -> same."""

    def __init__(self, dim: int, size: int, drop_path: float = 0.0, **ss2d_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.ss2d = SS2D(dim, size, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ss2d(self.norm(x)))


def _conv_in_silu(ch: int, k: int) -> nn.Sequential:
    groups = ch if k > 1 else 1
    return nn.Sequential(nn.Conv2d(ch, ch, k, padding=k // 2, groups=groups, bias=k == 1), nn.InstanceNorm2d(ch), nn.SiLU())


class LSSBlock(nn.Module):
    """Locality-enhanced state-space block: [cascaded VSS layers | 1x1-dw5x5-1x1 | 1x1-dw7x7-1x1] -> 1x1 fuse + x.

    (B, H, W, d) -> same.
    """

    def __init__(self, dim: int, size: int, n_vss: int, drop_path: float = 0.0, **ss2d_kwargs):
        super().__init__()
        self.vss = nn.Sequential(*[VSSLayer(dim, size, drop_path, **ss2d_kwargs) for _ in range(n_vss)])
        self.local5 = nn.Sequential(_conv_in_silu(dim, 1), _conv_in_silu(dim, 5), _conv_in_silu(dim, 1))
        self.local7 = nn.Sequential(_conv_in_silu(dim, 1), _conv_in_silu(dim, 7), _conv_in_silu(dim, 1))
        self.fuse = nn.Conv2d(3 * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.vss(x).permute(0, 3, 1, 2)
        xc = x.permute(0, 3, 1, 2)
        y = self.fuse(torch.cat([g, self.local5(xc), self.local7(xc)], dim=1))
        return y.permute(0, 2, 3, 1) + x


class PatchExpand(nn.Module):
    """(B, H, W, 2d) -> Linear(2d -> 4d) -> pixel shuffle -> (B, 2H, 2W, d) -> LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.expand = nn.Linear(2 * dim, 4 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        x = self.expand(x).view(B, H, W, 2, 2, self.dim)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, self.dim)
        return self.norm(x)


def _lss_split(depth: int) -> list[int]:
    """VSS layers per LSS block for a stage of ``depth`` VSS layers (MambaAD: blocks of 3, else of 2)."""
    if depth % 3 == 0:
        return [3] * (depth // 3)
    if depth % 2 == 0:
        return [2] * (depth // 2)
    return [depth]


class MambaDecoder(nn.Module):
    """Stage 0 at the bottleneck (S/32), stages 1..3 each PatchExpand x2 then LSS blocks.

    Input (B, 512, s, s) -> [(B, 256, 2s, 2s), (B, 128, 4s, 4s), (B, 64, 8s, 8s)] (stages 1..3, reversed to match
    the encoder's level order [level1, level2, level3] = [(64, 8s), (128, 4s), (256, 2s)]).
    """

    def __init__(self, bottleneck_size: int, dims=(512, 256, 128, 64), depths=(3, 4, 6, 3), drop_path: float = 0.2,
                 **ss2d_kwargs):
        super().__init__()
        splits = [_lss_split(d) for d in depths]
        # drop-path rates: linspace(0, rate) reversed over all VSS layers; a block uses the rate at its index
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()[::-1]
        self.stages = nn.ModuleList()
        offset = 0
        for i, (dim, split) in enumerate(zip(dims, splits)):
            size = bottleneck_size * 2 ** i
            stage_rates = rates[offset: offset + depths[i]]
            blocks = [LSSBlock(dim, size, n, stage_rates[j] if j < len(stage_rates) else 0.0, **ss2d_kwargs)
                      for j, n in enumerate(split)]
            self.stages.append(nn.Sequential(*([PatchExpand(dim)] if i else []), *blocks))
            offset += depths[i]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.permute(0, 2, 3, 1)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i:
                outs.insert(0, x.permute(0, 3, 1, 2).contiguous())
        return outs
