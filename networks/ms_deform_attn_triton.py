"""Multi-scale deformable attention's sampling and weighted sum as one Triton kernel (inference only).

:func:`networks.ms_deform_attn.ms_deform_attn_core` (the reference) samples each level with
``F.grid_sample`` into a ``(B*M, D, Lq, L*P)`` tensor, then multiplies by the attention weights and sums:
on a GPU that tensor is written and read back once per module call (hundreds of megabytes at batch 64).
This kernel keeps the running sum in registers: each program takes a block of queries of one head of one
image, and for every level and point reads the four neighbours of the sampling location (bilinear, zero
outside the map, pixel centres at integer + 0.5: ``grid_sample``'s ``align_corners=False``) and adds them
with the attention weight. Sums are float32 whatever the values' dtype, as the reference samples.

Only the forward: under autograd the reference runs (:func:`deform_attn_core`). The kernel is compiled by
Triton at run time (no build step); on the CPU, and where Triton is missing, the reference runs. The tests
run the kernel on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    constexpr = tl.constexpr
except ImportError:  # CPU-only installs: the reference path only
    triton = tl = None
    constexpr = int

#: At most this many levels (the published model has 3).
MAX_LEVELS = 3


def available() -> bool:
    """Whether Triton is installed (a GPU is needed too, except in interpreter mode)."""
    return triton is not None


def _sample_and_sum(value, locations, weights, out, num_queries, num_heads, head_dim, tokens,
                    h0, w0, s0, h1, w1, s1, h2, w2, s2,
                    LEVELS: constexpr, POINTS: constexpr, BLOCK_Q: constexpr, BLOCK_D: constexpr):
    """One program: BLOCK_Q queries of head ``pid(1) % M`` of image ``pid(1) // M``; all of their D channels."""
    image = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    queries = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channels = tl.arange(0, BLOCK_D)
    query_ok = queries < num_queries
    channel_ok = channels < head_dim
    # (B, Lq, M, L, P): the (level, point) entries of one (image, query, head) are consecutive
    row = ((image * num_queries + queries).to(tl.int64) * num_heads + head) * (LEVELS * POINTS)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in tl.static_range(LEVELS):
        if level == 0:
            height, width, start = h0, w0, s0
        elif level == 1:
            height, width, start = h1, w1, s1
        else:
            height, width, start = h2, w2, s2
        level_rows = image.to(tl.int64) * tokens + start
        for point in tl.static_range(POINTS):
            entry = row + level * POINTS + point
            x = tl.load(locations + 2 * entry, mask=query_ok, other=0.0) * width - 0.5
            y = tl.load(locations + 2 * entry + 1, mask=query_ok, other=0.0) * height - 0.5
            weight = tl.load(weights + entry, mask=query_ok, other=0.0)
            # Outside [-1, size] every neighbour is outside the map; clamping keeps the integers small.
            x = tl.minimum(tl.maximum(x, -2.0), width + 1.0)
            y = tl.minimum(tl.maximum(y, -2.0), height + 1.0)
            x0 = tl.floor(x)
            y0 = tl.floor(y)
            fx = x - x0
            fy = y - y0
            ix = x0.to(tl.int32)
            iy = y0.to(tl.int32)
            for dy in tl.static_range(2):
                for dx in tl.static_range(2):
                    cx = ix + dx
                    cy = iy + dy
                    inside = query_ok & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
                    if dx == 1:
                        share_x = fx
                    else:
                        share_x = 1.0 - fx
                    if dy == 1:
                        share_y = fy
                    else:
                        share_y = 1.0 - fy
                    share = share_x * share_y * weight
                    token = level_rows + cy * width + cx
                    pointer = value + (token * num_heads + head)[:, None] * head_dim + channels[None, :]
                    sample = tl.load(pointer, mask=inside[:, None] & channel_ok[None, :], other=0.0)
                    acc += share[:, None] * sample.to(tl.float32)
    out_rows = (image * num_queries + queries).to(tl.int64) * (num_heads * head_dim) + head * head_dim
    tl.store(out + out_rows[:, None] + channels[None, :], acc, mask=query_ok[:, None] & channel_ok[None, :])


_KERNELS: list = []


def _kernel():
    # Compiled at first use; with TRITON_INTERPRET=1 set before Triton is imported, jit gives the interpreter
    if not _KERNELS:
        _KERNELS.append(triton.jit(_sample_and_sum))
    return _KERNELS[0]


def triton_core(value: Tensor, spatial_shapes: Sequence[tuple[int, int]], sampling_locations: Tensor,
                attention_weights: Tensor) -> Tensor:
    """:func:`networks.ms_deform_attn.ms_deform_attn_core`'s contract, float32 ``Tensor[B, Lq, M*D]``, by the kernel
    (CUDA tensors; CPU tensors in a process started with ``TRITON_INTERPRET=1``, Triton's interpreter, for tests)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    if not 1 <= len(spatial_shapes) <= MAX_LEVELS:
        raise ValueError(f"the Triton kernel takes 1 to {MAX_LEVELS} levels, not {len(spatial_shapes)}")
    batch, tokens, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
    if tokens != starts[-1] + shapes[-1][0] * shapes[-1][1]:
        raise ValueError(f"value has {tokens} tokens, spatial shapes {shapes} need {starts[-1] + shapes[-1][0] * shapes[-1][1]}")
    padded = [(h, w, s) for (h, w), s in zip(shapes, starts)] + [(0, 0, 0)] * (MAX_LEVELS - len(shapes))
    out = torch.empty((batch, num_queries, heads * head_dim), dtype=torch.float32, device=value.device)
    block_q = 32
    grid = (triton.cdiv(num_queries, block_q), batch * heads)
    _kernel()[grid](
        value.contiguous(), sampling_locations.float().contiguous(), attention_weights.float().contiguous(), out,
        num_queries, heads, head_dim, tokens, *[v for level in padded for v in level],
        LEVELS=levels, POINTS=points, BLOCK_Q=block_q, BLOCK_D=triton.next_power_of_2(head_dim))
    return out
