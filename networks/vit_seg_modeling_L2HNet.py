"""L2HNet: the high-resolution CNN encoder of VCNet (docs/design.md §3.1).

Seven resolution-preserving (RP) blocks at full resolution, their outputs concatenated, then three
weight-standardised strided convolutions down to stride 16. Works at width 64 ("light", the
published default) and 128 ("normal", which crashes in the published code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks.layers import conv_bn_relu


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation: per output channel, the stored weight is centred and
    divided by ``sqrt(biased variance + eps)`` at every forward pass (the raw weight is trained)."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, correction=0)
        weight = (self.weight - mean) / torch.sqrt(var + self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class RPBlock(nn.Module):
    """Resolution-preserving block: [1x1 | 3x3] branches -> 1x1 fuse -> + input (after the ReLU)."""

    def __init__(self, width: int, branch_ratio: float = 0.8) -> None:
        super().__init__()
        wide = int(branch_ratio * width)
        self.branches = nn.ModuleList([
            conv_bn_relu(width, width, 1),
            conv_bn_relu(width, wide, 3, padding=1),
        ])
        self.fuse_conv = conv_bn_relu(width + wide, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fuse_conv(torch.cat([branch(x) for branch in self.branches], dim=1))


def ws_conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                    groups: int, eps: float) -> nn.Sequential:
    return nn.Sequential(
        StdConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False, eps=eps),
        nn.GroupNorm(groups, out_channels, eps=1e-6),
        nn.ReLU(inplace=True),
    )


class L2HNet(nn.Module):
    """HR CNN encoder.

    Args:
        in_channels: image bands.
        width: RP-block width W (64 light, 128 normal).
        num_blocks: RP blocks (7).
        branch_ratio: the 3x3 branch has ``floor(branch_ratio * W)`` channels.
        out_channels: channels of out-conv1 (stride 2), out-conv2 (stride 4), out-conv3 (stride 16).
        gn_groups: GroupNorm groups of the out-convs.
        ws_eps: weight-standardisation epsilon.
    """

    def __init__(self, in_channels: int = 4, width: int = 64, num_blocks: int = 7, branch_ratio: float = 0.8,
                 out_channels: Sequence[int] = (896, 1024, 1024), gn_groups: int = 32, ws_eps: float = 1e-5) -> None:
        super().__init__()
        self.width = width
        self.out_channels = tuple(out_channels)
        self.startconv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.rpblocks = nn.ModuleList([RPBlock(width, branch_ratio) for _ in range(num_blocks)])
        c1, c2, c3 = self.out_channels
        self.out_conv1 = ws_conv_gn_relu(num_blocks * width, c1, 3, 2, 1, gn_groups, ws_eps)
        self.out_conv2 = ws_conv_gn_relu(c1, c2, 3, 2, 1, gn_groups, ws_eps)
        self.out_conv3 = ws_conv_gn_relu(c2, c3, 5, 4, 1, gn_groups, ws_eps)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """
        Args:
            x: ``Tensor[B, bands, H, W]``, H and W multiples of 16.

        Returns:
            ``F_s16`` and the list ``[F0 (B,W,H,W), F_s16 (B,c3,H/16,W/16), F_s4 (B,c2,H/4,W/4),
            F_s2 (B,c1,H/2,W/2)]``.
        """
        feature = self.startconv(x)
        block_outputs = []
        for block in self.rpblocks:
            feature = block(feature)
            block_outputs.append(feature)
        f_s2 = self.out_conv1(torch.cat(block_outputs, dim=1))
        f_s4 = self.out_conv2(f_s2)
        f_s16 = self.out_conv3(f_s4)
        return f_s16, [feature, f_s16, f_s4, f_s2]
