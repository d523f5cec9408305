"""Reverse-distillation bottleneck: multi-scale feature fusion + one-class embedding (RD4AD / MambaAD MFF-OCE)."""
from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.nets.resnet import ResNetBottleneck

__all__ = ["FusionBottleneck"]


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FusionBottleneck(nn.Module):
    """Encoder levels [(B,64,4s,4s), (B,128,2s,2s), (B,256,s,s)] -> (B, 512, s/2, s/2).

    level1 -> 3x3 s2 conv (128) + 1x1 conv(level2); -> 3x3 s2 conv (256) + 1x1 conv(level3); 1x1 conv;
    then 3 ResNet Bottleneck blocks (planes 128, expansion 4), the first with stride 2.
    """

    def __init__(self, channels=(64, 128, 256), n_blocks: int = 3):
        super().__init__()
        c1, c2, c3 = channels
        self.down1 = _conv_bn_relu(c1, c2, 3, 2)
        self.lateral2 = _conv_bn_relu(c2, c2, 1)
        self.down2 = _conv_bn_relu(c2, c3, 3, 2)
        self.lateral3 = _conv_bn_relu(c3, c3, 1)
        self.fuse = _conv_bn_relu(c3, c3, 1)
        planes, expansion = 128, ResNetBottleneck.expansion
        downsample = nn.Sequential(nn.Conv2d(c3, planes * expansion, 1, 2, bias=False), nn.BatchNorm2d(planes * expansion))
        blocks = [ResNetBottleneck(c3, planes, spatial_dims=2, stride=2, downsample=downsample)]
        blocks += [ResNetBottleneck(planes * expansion, planes, spatial_dims=2) for _ in range(n_blocks - 1)]
        self.blocks = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = feats
        x = self.down1(f1) + self.lateral2(f2)
        x = self.down2(x) + self.lateral3(f3)
        return self.blocks(self.fuse(x))
