"""A plain convolutional reverse-distillation decoder (RD4AD-style student), the reference for SP-Mamba's Mamba decoder.

Same interface as :class:`~spmamba.models.mamba_decoder.MambaDecoder`: bottleneck (B, 512, s, s) ->
[(B, 64, 8s, 8s), (B, 128, 4s, 4s), (B, 256, 2s, 2s)] (the encoder's level order). Each stage upsamples x2 with a
2x2 transposed convolution (BN, ReLU) and refines with one residual block of two 3x3 convolutions.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["CNNDecoder"]


class _UpStage(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout),
                                nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.act(x + self.body(x))


class CNNDecoder(nn.Module):
    def __init__(self, dims=(512, 256, 128, 64)):
        super().__init__()
        self.stages = nn.ModuleList(_UpStage(dims[i], dims[i + 1]) for i in range(len(dims) - 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            outs.insert(0, x)
        return outs
