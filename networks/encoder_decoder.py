"""EncoderDecoder: wires L2HNet, the LR tokens, ViT_FuseX and the two heads together (docs/design.md §1).

``forward(x)`` returns ``(vit_logits, cnn_logits)`` in the published order, both at input size.
The CNN branch never sees the transformer: its logits depend only on L2HNet, the token projector,
the position table, the decoder and the segmentation head.
"""

from __future__ import annotations

import ml_collections
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks.config import SIZE_MULTIPLE
from networks.heads import FCNHead, UPerHead
from networks.vit_fusex import ViT_FuseX
from networks.vit_seg_modeling import DecoderCup, SegmentationHead
from networks.vit_seg_modeling_L2HNet import L2HNet


def check_input_size(height: int, width: int) -> None:
    """Raise ValueError unless both sides are positive multiples of 32 (three token levels need an
    even stride-16 grid)."""
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        def up(v: int) -> int:
            return max(SIZE_MULTIPLE, -(-v // SIZE_MULTIPLE) * SIZE_MULTIPLE)

        raise ValueError(
            f"input size {height}x{width} is not supported: height and width must be multiples of "
            f"{SIZE_MULTIPLE} (pad to {up(height)}x{up(width)})"
        )


def resize_position_table(table: Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Bicubic resize of a ``(1, gh*gw, D)`` position table to ``new_grid`` (docs/design.md §10, defect 14)."""
    if tuple(grid) == tuple(new_grid):
        return table
    dim = table.shape[-1]
    as_map = table.reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2)
    resized = F.interpolate(as_map.float(), size=new_grid, mode="bicubic", align_corners=False).to(table.dtype)
    return resized.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)


class EncoderDecoder(nn.Module):
    """VCNet. Build it with :func:`build_model` from a config (``networks.config``)."""

    def __init__(self, *, in_channels: int, num_classes: int, img_size: int, l2hnet: dict, vit: dict,
                 decoder: dict, uper: dict, aux_head: dict) -> None:
        super().__init__()
        check_input_size(img_size, img_size)
        self.num_classes = num_classes
        self.in_channels = in_channels
        embed_dim = vit["embed_dim"]
        self.grid = (img_size // 16, img_size // 16)
        self.cnn_encoder = L2HNet(in_channels=in_channels, **l2hnet)
        c_s2, c_s4, c_s16 = self.cnn_encoder.out_channels
        # One scalar per 16x16 cell, broadcast over the D channels by the position-table add.
        self.patch_embeddings = nn.Conv2d(c_s16, 1, 1)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        self.token_dropout = nn.Dropout(vit["token_dropout"])
        backbone_args = {k: v for k, v in vit.items() if k != "token_dropout"}
        self.backbone = ViT_FuseX(cnn_channels=self.cnn_encoder.width, **backbone_args)
        self.adjust_channel_conv = nn.Conv2d(c_s4, embed_dim, 1)
        self.adjust_channel_conv2 = nn.Conv2d(2 * embed_dim, embed_dim, 1)
        self.decode_head = UPerHead([embed_dim] * 4, uper["channels"], num_classes, uper["pool_scales"],
                                    uper["dropout"])
        if aux_head["enabled"]:
            self.auxiliary_head = FCNHead(embed_dim, aux_head["channels"], num_classes, aux_head["in_index"],
                                          aux_head["dropout"])
        else:
            self.auxiliary_head = None
        self.decoder_cup = DecoderCup(embed_dim, decoder["head_channels"], (c_s2, c_s4, c_s16), decoder["channels"])
        self.segmentation_head = SegmentationHead(self.decoder_cup.out_channels, num_classes)

    def forward(self, x: Tensor, return_aux: bool = False) -> tuple[Tensor, ...]:
        """
        Args:
            x: normalised image ``Tensor[B, bands, H, W]``, H and W multiples of 32.
            return_aux: also return the auxiliary FCN logits (needs ``aux_head.enabled``).

        Returns:
            ``(vit_logits, cnn_logits)`` (plus ``aux_logits`` with ``return_aux``), each
            ``Tensor[B, num_classes, H, W]``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if not torch.compiler.is_compiling():
            check_input_size(height, width)
        h, w = height // 16, width // 16
        f_s16, (f0, _, f_s4, f_s2) = self.cnn_encoder(x)
        # (B, 1, h, w) -> (B, h*w, 1) + (1, h*w, D) -> (B, h*w, D)
        scalars = self.patch_embeddings(f_s16).flatten(2).transpose(1, 2)
        positions = resize_position_table(self.position_embeddings, self.grid, (h, w))
        tokens = self.token_dropout(scalars + positions)
        features = self.backbone(tokens, f0, h, w)
        features[0] = self.adjust_channel_conv2(torch.cat([self.adjust_channel_conv(f_s4), features[0]], dim=1))
        vit_logits = self.decode_head(features, (height, width))
        cnn_logits = self.segmentation_head(self.decoder_cup(tokens, h, w, f_s16, f_s4, f_s2))
        if not return_aux:
            return vit_logits, cnn_logits
        if self.auxiliary_head is None:
            raise ValueError("return_aux=True needs a model built with aux_head.enabled")
        return vit_logits, cnn_logits, self.auxiliary_head(features, (height, width))


def build_model(config: ml_collections.ConfigDict) -> EncoderDecoder:
    """Build VCNet from a config (see ``networks.config``); the only place config becomes arguments."""
    vit = config.vit.to_dict()
    vit["interaction_indexes"] = [tuple(r) for r in vit["interaction_indexes"]]
    return EncoderDecoder(
        in_channels=config.in_channels,
        num_classes=config.num_classes,
        img_size=config.img_size,
        l2hnet=config.l2hnet.to_dict(),
        vit=vit,
        decoder=config.decoder.to_dict(),
        uper=config.uper.to_dict(),
        aux_head=config.aux_head.to_dict(),
    )
