"""The CNN branch's cascaded decoder (DecoderCup) and segmentation head (docs/design.md §3.6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from networks.layers import conv_bn_relu, resize, tokens_to_map


class DecoderCup(nn.Module):
    """Token map -> fuse F_s16 -> x4 -> fuse F_s4 -> x2 -> fuse F_s2 -> x2 (full resolution).

    Every upsampling is bilinear with ``align_corners=True`` (``UpsamplingBilinear2d``); every
    conv is 3x3 without bias -> BN -> ReLU. The published dead 1-channel ``conv3`` path is not built.

    Args:
        embed_dim: token width D.
        head_channels: width of the head conv on the token map.
        skip_channels: L2HNet channels ``(F_s2, F_s4, F_s16)``.
        channels: outputs of conv1 (s16), conv2 (s4) and conv4 (full resolution).
    """

    def __init__(self, embed_dim: int, head_channels: int, skip_channels: Sequence[int],
                 channels: Sequence[int]) -> None:
        super().__init__()
        c_s2, c_s4, c_s16 = skip_channels
        self.out_channels = channels[2]
        self.conv_more = conv_bn_relu(embed_dim, head_channels, 3, padding=1, bias=False)
        self.conv1 = conv_bn_relu(head_channels + c_s16, channels[0], 3, padding=1, bias=False)
        self.conv2 = conv_bn_relu(channels[0] + c_s4, channels[1], 3, padding=1, bias=False)
        self.conv4 = conv_bn_relu(channels[1] + c_s2, channels[2], 3, padding=1, bias=False)

    @staticmethod
    def up(x: Tensor, factor: int) -> Tensor:
        return resize(x, (x.shape[-2] * factor, x.shape[-1] * factor), align_corners=True)

    def forward(self, tokens: Tensor, h: int, w: int, f_s16: Tensor, f_s4: Tensor, f_s2: Tensor) -> Tensor:
        """Returns ``Tensor[B, channels[2], 16h, 16w]``."""
        x = self.conv_more(tokens_to_map(tokens, h, w))
        x = self.conv1(torch.cat([x, f_s16], dim=1))
        x = self.conv2(torch.cat([self.up(x, 4), f_s4], dim=1))
        x = self.conv4(torch.cat([self.up(x, 2), f_s2], dim=1))
        return self.up(x, 2)


class SegmentationHead(nn.Sequential):
    """3x3 conv with bias to the classes (published key ``segmentation_head.0``)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(nn.Conv2d(in_channels, num_classes, 3, padding=1))
