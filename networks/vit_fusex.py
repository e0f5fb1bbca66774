"""ViT_FuseX: the hybrid transformer backbone of VCNet (docs/design.md §3.3).

ViT-tiny blocks on the LR-token sequence, a spatial-prior CNN on the L2HNet full-resolution
feature, and four interaction stages that exchange information between the two through
multi-scale deformable attention. Attribute names follow the published state_dict (docs/design.md §9).

Token layouts: ViT tokens X are ``(B, h*w, D)`` with ``h, w = H/16, W/16``; CNN tokens C are the
three levels ``[C8 | C16 | C32]`` of ``(2h, 2w)``, ``(h, w)`` and ``(h/2, w/2)`` tokens, each
flattened row-major, so ``h`` and ``w`` must be even (input sides multiples of 32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from networks.layers import map_to_tokens, resize, tokens_to_map
from networks.ms_deform_attn import KERNELS, MSDeformAttn, level_reference_points

LN_EPS = 1e-6


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


def level_shapes(h: int, w: int) -> list[tuple[int, int]]:
    """Spatial shapes of the CNN-token levels at strides 8, 16 and 32."""
    return [(2 * h, 2 * w), (h, w), (h // 2, w // 2)]


def split_levels(tokens: Tensor, h: int, w: int) -> list[Tensor]:
    """Split CNN tokens into their three levels (token form)."""
    return list(tokens.split([a * b for a, b in level_shapes(h, w)], dim=1))


def add_to_s16(c: Tensor, x: Tensor, h: int, w: int) -> Tensor:
    """``C16 <- C16 + X`` (out of place)."""
    c8, c16, c32 = split_levels(c, h, w)
    return torch.cat([c8, c16 + x, c32], dim=1)


# --------------------------------------------------------------------------------------------------
# ViT-tiny block (DeiT layout, docs/design.md §3.3.3)
# --------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with one qkv projection.

    ``fused=True`` uses ``F.scaled_dot_product_attention`` (faster); the default explicit
    softmax(QK^T/sqrt(d))V path is the parity reference. Both agree to float32 rounding.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        # (B, N, 3*D) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale: ``X += g1*MHSA(LN(X)); X += g2*MLP(LN(X))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 layer_scale_init: float = 1.0, drop_path: float = 0.0, fused_attention: bool = False) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, fused_attention)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------------------------------
# Spatial-prior CNN (docs/design.md §3.3.1)
# --------------------------------------------------------------------------------------------------
def _conv_bn_relu_nobias(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """CNN pyramid on the L2HNet full-resolution feature: strides 4, 8, 16, 32, projected to D."""

    def __init__(self, in_channels: int = 64, inplanes: int = 64, embed_dim: int = 192) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn_relu_nobias(in_channels, inplanes, 2),
            *_conv_bn_relu_nobias(inplanes, inplanes, 1),
            *_conv_bn_relu_nobias(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_bn_relu_nobias(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu_nobias(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu_nobias(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``S1`` as a map ``(B,D,H/4,W/4)`` and ``S2, S3, S4`` as tokens ``(B,N_l,D)``."""
        a1 = self.stem(x)
        a2 = self.conv2(a1)
        a3 = self.conv3(a2)
        a4 = self.conv4(a3)
        return self.fc1(a1), map_to_tokens(self.fc2(a2)), map_to_tokens(self.fc3(a3)), map_to_tokens(self.fc4(a4))


# --------------------------------------------------------------------------------------------------
# Interaction building blocks (docs/design.md §3.3.4)
# --------------------------------------------------------------------------------------------------
class LevelDWConv(nn.Module):
    """One depthwise 3x3 conv applied to each CNN-token level separately (weights shared)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        levels = split_levels(tokens, h, w)
        return torch.cat([map_to_tokens(self.dwconv(tokens_to_map(t, a, b)))
                          for t, (a, b) in zip(levels, level_shapes(h, w))], dim=1)


class ConvFFN(nn.Module):
    """Linear -> per-level depthwise 3x3 (``dwconv_type``) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, dwconv_type: type[nn.Module] = LevelDWConv) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = dwconv_type(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(tokens), h, w)))


class MultiRFDWConv(nn.Module):
    """Per level (separate weights): half the channels 3x3, half 5x5 depthwise -> BN -> GELU.

    Published names: ``dwconv{1,3,5}`` (3x3) and ``dwconv{2,4,6}`` (5x5) for the stride-8/16/32
    levels, ``bn{1,2,3}`` per level.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.half = hidden // 2
        other = hidden - self.half
        for level in range(3):
            setattr(self, f"dwconv{2 * level + 1}", nn.Conv2d(self.half, self.half, 3, padding=1, groups=self.half))
            setattr(self, f"dwconv{2 * level + 2}", nn.Conv2d(other, other, 5, padding=2, groups=other))
            setattr(self, f"bn{level + 1}", nn.BatchNorm2d(hidden))
        self.act = nn.GELU()

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        outputs = []
        for level, (t, (a, b)) in enumerate(zip(split_levels(tokens, h, w), level_shapes(h, w))):
            feature = tokens_to_map(t, a, b)
            small = getattr(self, f"dwconv{2 * level + 1}")(feature[:, : self.half])
            large = getattr(self, f"dwconv{2 * level + 2}")(feature[:, self.half:])
            mixed = getattr(self, f"bn{level + 1}")(torch.cat([small, large], dim=1))
            outputs.append(map_to_tokens(self.act(mixed)))
        return torch.cat(outputs, dim=1)


class MRFP(ConvFFN):
    """Multi-receptive-field FFN: a Conv-FFN whose depthwise stage is :class:`MultiRFDWConv`.
    Replaces C (no residual); the GELU after the one inside MultiRFDWConv matches the checkpoint."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(dim, hidden, MultiRFDWConv)


class DeformableAttentionFFN(nn.Module):
    """The parts shared by the injector and the extractor: query/feature LayerNorms, a 3-level
    MSDA and a Conv-FFN with its LayerNorm (published names ``query_norm``, ``feat_norm``,
    ``attn``, ``ffn``, ``ffn_norm``)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, ffn_hidden: int) -> None:
        super().__init__()
        self.query_norm = layer_norm(dim)
        self.feat_norm = layer_norm(dim)
        self.attn = MSDeformAttn(dim, n_levels=3, n_heads=num_heads, n_points=n_points, ratio=deform_ratio)
        self.ffn = ConvFFN(dim, ffn_hidden)
        self.ffn_norm = layer_norm(dim)


class MultiScaleExtractor(DeformableAttentionFFN):
    """``Y = Q0 + MSDA(LN_q(Q0), LN_f(F0)); Y += ConvFFN(LN_ffn(Y))`` (published ``cfinter``)."""

    def forward(self, query: Tensor, feat: Tensor, ref: Tensor, h: int, w: int) -> Tensor:
        out = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), level_shapes(h, w))
        return out + self.ffn(self.ffn_norm(out), h, w)


class CNNToViTInjector(DeformableAttentionFFN):
    """CTI_toV: deformable self-attention over C, resampled to stride 16, added to X through gamma."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, ffn_hidden: int,
                 init_value: float = 0.0) -> None:
        super().__init__(dim, num_heads, n_points, deform_ratio, ffn_hidden)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor, c: Tensor, ref: Tensor, h: int, w: int) -> Tensor:
        shapes = level_shapes(h, w)
        attended = self.attn(self.query_norm(c), ref, self.feat_norm(c), shapes)
        attended = attended + self.ffn(self.ffn_norm(attended), h, w)  # no skip from C
        a8, a16, a32 = (tokens_to_map(t, a, b) for t, (a, b) in zip(split_levels(attended, h, w), shapes))
        # x0.5 bilinear (AC=False) of the stride-8 part is exactly a 2x2 mean; x2 for stride 32.
        merged = resize(a8, (h, w)) + a16 + resize(a32, (h, w))
        return x + self.gamma * map_to_tokens(merged)


class ViTToCNNExtractor(nn.Module):
    """CTI_toC: ``C <- Extractor(LN_d(C), LN_e(C))``; the residual base is the normalised C."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, ffn_hidden: int) -> None:
        super().__init__()
        self.query_norm = layer_norm(dim)
        self.feat_norm = layer_norm(dim)
        self.cfinter = MultiScaleExtractor(dim, num_heads, n_points, deform_ratio, ffn_hidden)

    def forward(self, c: Tensor, ref: Tensor, h: int, w: int) -> Tensor:
        return self.cfinter(self.query_norm(c), self.feat_norm(c), ref, h, w)


class ExtraExtractor(ViTToCNNExtractor):
    """Last-stage extra extractor: a pre Conv-FFN residual on C, then the extractor."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, ffn_hidden: int) -> None:
        super().__init__(dim, num_heads, n_points, deform_ratio, ffn_hidden)
        self.ffn = ConvFFN(dim, ffn_hidden)
        self.ffn_norm = layer_norm(dim)

    def forward(self, c: Tensor, ref: Tensor, h: int, w: int) -> Tensor:
        c = c + self.ffn(self.ffn_norm(c), h, w)
        return super().forward(c, ref, h, w)


class InteractionBlock(nn.Module):
    """One interaction stage (docs/design.md §3.3.5): MRFP, injector, ViT blocks, extractor(s)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, ffn_hidden: int,
                 mrfp_hidden: int, injector_init: float, extra_extractors: int = 0) -> None:
        super().__init__()
        self.mrfp = MRFP(dim, mrfp_hidden)
        self.cti_tov = CNNToViTInjector(dim, num_heads, n_points, deform_ratio, ffn_hidden, injector_init)
        self.cti_toc = ViTToCNNExtractor(dim, num_heads, n_points, deform_ratio, ffn_hidden)
        if extra_extractors:
            self.extra_CTIs = nn.ModuleList(
                [ExtraExtractor(dim, num_heads, n_points, deform_ratio, ffn_hidden) for _ in range(extra_extractors)]
            )
        else:
            self.extra_CTIs = None

    def forward(self, x: Tensor, c: Tensor, blocks: Sequence[nn.Module], ref: Tensor, h: int,
                w: int) -> tuple[Tensor, Tensor]:
        c = self.mrfp(c, h, w)
        c = add_to_s16(c, x, h, w)
        x = self.cti_tov(x, c, ref, h, w)
        for block in blocks:
            x = block(x)
        c = add_to_s16(c, x, h, w)
        c = self.cti_toc(c, ref, h, w)
        for extractor in self.extra_CTIs or ():
            c = add_to_s16(c, x, h, w)
            c = extractor(c, ref, h, w)
        return x, c


# --------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------
class ViT_FuseX(nn.Module):  # noqa: N801 - the published class name
    """Hybrid ViT backbone.

    Args:
        cnn_channels: channels of the L2HNet full-resolution feature F0 (the L2HNet width).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, layer_scale_init, drop_path_rate,
        fused_attention: the ViT-tiny blocks.
        interaction_indexes: inclusive block ranges of the interaction stages.
        deform_num_heads, n_points, deform_ratio: the deformable attentions.
        cffn_ratio, mrfp_ratio: Conv-FFN and MRFP hidden widths as fractions of ``embed_dim``.
        extra_extractors: extra extractors in the last stage.
        injector_init: initial injector gamma.
        spm_channels: spatial-prior CNN base width.
        deform_attn_kernel: what computes the deformable attentions' sampling (``networks.ms_deform_attn.KERNELS``).
    """

    def __init__(self, cnn_channels: int = 64, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, layer_scale_init: float = 1.0,
                 drop_path_rate: float = 0.0, fused_attention: bool = False,
                 interaction_indexes: Sequence[Sequence[int]] = ((0, 2), (3, 5), (6, 8), (9, 11)),
                 deform_num_heads: int = 6, n_points: int = 4, deform_ratio: float = 1.0, cffn_ratio: float = 0.25,
                 mrfp_ratio: float = 6.0, extra_extractors: int = 4, injector_init: float = 0.0,
                 spm_channels: int = 64, deform_attn_kernel: str = "pytorch") -> None:
        super().__init__()
        if deform_attn_kernel not in KERNELS:
            raise ValueError(f"deform_attn_kernel must be one of {KERNELS}, not {deform_attn_kernel!r}")
        self.embed_dim = embed_dim
        self.interaction_indexes = [tuple(int(i) for i in r) for r in interaction_indexes]
        if len(self.interaction_indexes) != 4:
            raise ValueError(f"ViT_FuseX needs 4 interaction stages (outputs P1..P4), got {self.interaction_indexes}")
        covered = [i for a, b in self.interaction_indexes for i in range(a, b + 1)]
        if covered != list(range(depth)):
            raise ValueError(f"interaction_indexes {self.interaction_indexes} must cover blocks 0..{depth - 1} in order")
        drop_rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layer_scale_init, drop_rates[i], fused_attention)
            for i in range(depth)
        ])
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm2 = SpatialPriorModule(cnn_channels, spm_channels, embed_dim)
        ffn_hidden = int(embed_dim * cffn_ratio)
        mrfp_hidden = int(embed_dim * mrfp_ratio)
        last = len(self.interaction_indexes) - 1
        self.interactions = nn.ModuleList([
            InteractionBlock(embed_dim, deform_num_heads, n_points, deform_ratio, ffn_hidden, mrfp_hidden,
                             injector_init, extra_extractors if i == last else 0)
            for i in range(len(self.interaction_indexes))
        ])
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norm1 = nn.BatchNorm2d(embed_dim)
        self.norm2 = nn.BatchNorm2d(embed_dim)
        self.norm3 = nn.BatchNorm2d(embed_dim)
        self.norm4 = nn.BatchNorm2d(embed_dim)
        self.init_weights(injector_init)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.kernel = deform_attn_kernel

    @torch.no_grad()
    def init_weights(self, injector_init: float = 0.0) -> None:
        """Published initialisation (docs/design.md §3.10). The spatial-prior CNN keeps PyTorch defaults, as the
        published model's used copy does."""

        def init_module(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.blocks.apply(init_module)
        self.interactions.apply(init_module)
        self.up.apply(init_module)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
            elif isinstance(module, CNNToViTInjector):
                module.gamma.fill_(injector_init)
        nn.init.normal_(self.level_embed)

    def forward(self, tokens: Tensor, f0: Tensor, h: int, w: int) -> list[Tensor]:
        """
        Args:
            tokens: ``Tensor[B, h*w, D]`` the LR-token embeddings E.
            f0: ``Tensor[B, cnn_channels, 16h, 16w]`` the L2HNet full-resolution feature.
            h, w: token grid (input size / 16), both even.

        Returns:
            ``[P1 (B,D,4h,4w), P2 (B,D,2h,2w), P3 (B,D,h,w), P4 (B,D,h/2,w/2)]``.
        """
        s1, s2, s3, s4 = self.spm2(f0)
        level = self.level_embed.to(s2.dtype)
        c = torch.cat([s2 + level[0], s3 + level[1], s4 + level[2]], dim=1)
        ref = level_reference_points(level_shapes(h, w), device=c.device)
        x = tokens
        stage_outputs = []
        for layer, (first, last) in zip(self.interactions, self.interaction_indexes):
            x, c = layer(x, c, self.blocks[first: last + 1], ref, h, w)
            stage_outputs.append(tokens_to_map(x, h, w))
        c8, c16, c32 = (tokens_to_map(t, a, b) for t, (a, b) in zip(split_levels(c, h, w), level_shapes(h, w)))
        t1 = self.up(c8) + s1
        p1 = self.norm1(t1 + resize(stage_outputs[0], (4 * h, 4 * w)))
        p2 = self.norm2(c8 + resize(stage_outputs[1], (2 * h, 2 * w)))
        p3 = self.norm3(c16 + stage_outputs[2])
        p4 = self.norm4(c32 + resize(stage_outputs[3], (h // 2, w // 2)))
        return [p1, p2, p3, p4]
