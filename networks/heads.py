"""Segmentation heads of the transformer branch: UPerHead (docs/design.md §3.5) and the FCN auxiliary head (3.7).

Attribute names follow the mmsegmentation names of the published checkpoint (``lateral_convs``,
``psp_modules``, ``bottleneck``, ``fpn_convs``, ``fpn_bottleneck``, ``conv_seg``), built with plain
constructors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from networks.layers import resize


class ConvModule(nn.Module):
    """Conv (with bias) -> BatchNorm -> ReLU, keys ``conv`` and ``norm``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class UPerHead(nn.Module):
    """Pyramid pooling on the coarsest feature + FPN over all four, fused at the finest scale.

    Args:
        in_channels: channels of each of the four inputs (finest first).
        channels: internal width (512).
        num_classes: output classes.
        pool_scales: PPM adaptive-pool sizes.
        dropout: Dropout2d before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        *fine, coarsest = in_channels
        self.psp_modules = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(coarsest, channels, 1)) for scale in pool_scales
        ])
        self.bottleneck = ConvModule(coarsest + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in fine])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3) for _ in fine])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp_forward(self, x: Tensor) -> Tensor:
        pooled = [resize(module(x), x.shape[-2:]) for module in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features: Sequence[Tensor], out_size: tuple[int, int]) -> Tensor:
        """
        Args:
            features: ``[P1, P2, P3, P4]``, finest (stride 4) first.
            out_size: size of the returned logits (the input size).
        """
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.psp_forward(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(o, size) for o in outs], dim=1))
        return resize(self.conv_seg(self.dropout(fused)), out_size)


class FCNHead(nn.Module):
    """Auxiliary FCN head: 3x3 ConvBNReLU -> Dropout2d -> 1x1 classifier (off by default)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor], out_size: tuple[int, int]) -> Tensor:
        return resize(self.conv_seg(self.dropout(self.convs(features[self.in_index]))), out_size)
