"""Multi-scale deformable attention in pure PyTorch (docs/design.md §3.3.4, "MSDA").

No compiled extension: the sampling is ``F.grid_sample`` with bilinear interpolation, zero padding
and ``align_corners=False``, which is exactly the Deformable-DETR kernel's semantics (pixel centres
on integers, neighbours outside the map contribute 0). Works on CPU and GPU, in float32 and
bfloat16, with gradients.

Under bfloat16 (autocast or a bfloat16 module) the sampling offsets, the locations, the grid and the
sampling itself stay float32: a bfloat16 coordinate near 1 has a step of 2^-8, a quarter of a
pixel of a 64-wide level, which would move every sample. Values and projections may be bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks import ms_deform_attn_triton

#: What computes the sampling and weighted sum: ``pytorch`` (:func:`ms_deform_attn_core`, the reference,
#: every device, with gradients) or ``triton`` (one fused kernel on CUDA for inference,
#: :mod:`networks.ms_deform_attn_triton`; the reference elsewhere and under autograd).
KERNELS = ("pytorch", "triton")


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample every level at the given locations and sum with the attention weights.

    Args:
        value: ``Tensor[B, sum(H_l*W_l), M, D]`` values of all levels, row-major per level.
        spatial_shapes: ``[(H_l, W_l), ...]`` for the L levels, in the order of ``value``.
        sampling_locations: ``Tensor[B, Lq, M, L, P, 2]`` normalised (x, y) in [0, 1].
        attention_weights: ``Tensor[B, Lq, M, L, P]`` (already softmax-normalised).

    Returns:
        ``Tensor[B, Lq, M*D]``, heads concatenated.
    """
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [h * w for h, w in spatial_shapes]
    value_levels = value.split(sizes, dim=1)
    grids = 2.0 * sampling_locations - 1.0  # grid_sample's [-1, 1] coordinates
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (B, H*W, M, D) -> (B*M, D, H, W)
        value_map = value_levels[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, height, width)
        # (B, Lq, M, P, 2) -> (B*M, Lq, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # Sampled in float32 at least (a bfloat16 grid would round the coordinates).
        dtype = torch.promote_types(value_map.dtype, torch.float32)
        sample = F.grid_sample(value_map.to(dtype), grid.to(dtype), mode="bilinear", padding_mode="zeros",
                               align_corners=False)
        sampled.append(sample)  # (B*M, D, Lq, P)
    # (B, Lq, M, L, P) -> (B*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, num_levels * num_points)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*M, D, Lq, L*P)
    output = (stacked * weights.to(stacked.dtype)).sum(-1)  # (B*M, D, Lq)
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous()


def deform_attn_core(value: Tensor, spatial_shapes: Sequence[tuple[int, int]], sampling_locations: Tensor,
                     attention_weights: Tensor, kernel: str = "pytorch") -> Tensor:
    """:func:`ms_deform_attn_core`, by the Triton kernel where ``kernel`` is ``triton``, the tensors are on CUDA,
    Triton is installed and no gradient is asked for; by the reference otherwise (results agree to float32
    rounding: the sums run in another order)."""
    inputs = (value, sampling_locations, attention_weights)
    if (kernel == "triton" and value.is_cuda and ms_deform_attn_triton.available()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))):
        return ms_deform_attn_triton.triton_core(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_core(value, spatial_shapes, sampling_locations, attention_weights)


def level_reference_points(spatial_shapes: Sequence[tuple[int, int]], device=None, dtype=None) -> Tensor:
    """Pixel-centre reference of every token of every level, levels concatenated.

    Returns:
        ``Tensor[sum(H_l*W_l), 2]`` with ``((j + 0.5) / W_l, (i + 0.5) / H_l)`` for row i, column j.
    """
    points = []
    for height, width in spatial_shapes:
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1))
    result = torch.cat(points, dim=0)
    return result if dtype is None else result.to(dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (published names: sampling_offsets, attention_weights,
    value_proj, output_proj).

    Args:
        d_model: token width.
        n_levels: number of feature levels L.
        n_heads: attention heads M (``d_model * ratio`` must divide by it).
        n_points: sampling points P per head and level.
        ratio: value-projection width as a fraction of ``d_model``.
    """

    def __init__(self, d_model: int = 192, n_levels: int = 3, n_heads: int = 6, n_points: int = 4,
                 ratio: float = 1.0) -> None:
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(f"d_model * ratio ({value_dim}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.kernel = "pytorch"  # see KERNELS; set for the whole backbone by ViT_FuseX
        # (W_l, H_l) per level, by (spatial shapes, device): made once, not at every forward (a
        # host-to-device copy per call would block the host and break CUDA-graph capture).
        self._normalizers: dict[tuple, Tensor] = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Published init: a square ring of offsets per head, uniform attention, Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values  # L-infinity norm
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, values: Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> Tensor:
        """
        Args:
            query: ``Tensor[B, Lq, d_model]``.
            reference_points: ``Tensor[Lq, 2]`` or ``Tensor[B, Lq, 2]``, normalised (x, y), shared
                by all levels.
            values: ``Tensor[B, sum(H_l*W_l), d_model]``.
            spatial_shapes: ``[(H_l, W_l), ...]``.

        Returns:
            ``Tensor[B, Lq, d_model]``.
        """
        batch, num_queries, _ = query.shape
        if values.shape[1] != sum(h * w for h, w in spatial_shapes):
            raise ValueError(f"values have {values.shape[1]} tokens, spatial shapes {list(spatial_shapes)} need "
                             f"{sum(h * w for h, w in spatial_shapes)}")
        value = self.value_proj(values).view(batch, values.shape[1], self.n_heads, -1)
        with torch.autocast(query.device.type, enabled=False):  # offsets and locations in float32 (see module doc)
            offsets = F.linear(query.float(), self.sampling_offsets.weight.float(), self.sampling_offsets.bias.float())
        offsets = offsets.view(batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.float().softmax(-1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        # Offsets are in pixels of each level: divide by (W_l, H_l).
        normalizer = self._normalizer(spatial_shapes, query.device)
        ref = reference_points if reference_points.dim() == 3 else reference_points.unsqueeze(0)
        locations = ref[:, :, None, None, None, :].float() + offsets / normalizer[None, None, None, :, None, :]
        output = deform_attn_core(value, spatial_shapes, locations, weights, self.kernel)
        return self.output_proj(output.to(value.dtype))

    def _normalizer(self, spatial_shapes: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
        key = (tuple((int(h), int(w)) for h, w in spatial_shapes), device)
        if key not in self._normalizers:
            self._normalizers[key] = torch.tensor([[w, h] for h, w in key[0]], dtype=torch.float32, device=device)
        return self._normalizers[key]
