"""Small building blocks shared by the model's parts: token/map reshapes, bilinear resize, Conv-BN-ReLU."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, stride: int = 1,
                 bias: bool = True) -> nn.Sequential:
    """Conv -> BatchNorm -> ReLU as a Sequential (published keys ``.0`` conv, ``.1`` BN)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def tokens_to_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """``(B, height*width, C)`` row-major tokens -> ``(B, C, height, width)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def map_to_tokens(feature: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` row-major tokens."""
    return feature.flatten(2).transpose(1, 2)


def resize(feature: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """Bilinear resize; AC=False is the half-pixel variant used everywhere except the CNN decoder."""
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=align_corners)
