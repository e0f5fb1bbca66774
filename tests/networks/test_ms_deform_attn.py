"""Multi-scale deformable attention against a slow, loop-by-loop bilinear reference."""

import math

import pytest
import torch

from networks.ms_deform_attn import MSDeformAttn, level_reference_points, ms_deform_attn_core

SHAPES = [(4, 5), (2, 3), (3, 1)]  # non-square levels, one of width 1


def loop_reference(value, shapes, locations, weights):
    """Bilinear sampling written out: pixel (x*W - 0.5, y*H - 0.5), zero outside the map."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads * dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                acc = torch.zeros(dim, dtype=value.dtype)
                for lvl, (height, width) in enumerate(shapes):
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0].item() * width - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(dim, dtype=value.dtype)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < height and 0 <= xx < width:
                                    sample += wy * wx * value[b, starts[lvl] + yy * width + xx, m]
                        acc += weights[b, q, m, lvl, p].item() * sample
                out[b, q, m * dim:(m + 1) * dim] = acc
    return out


def random_inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, heads, dim, queries, points = 2, 2, 3, 5, 3
    tokens = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, tokens, heads, dim, generator=g, dtype=dtype)
    # Locations reach outside [0, 1] so that zero padding is exercised.
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=g, dtype=dtype)
    return value, locations, weights


def test_core_matches_loop_reference():
    value, locations, weights = random_inputs()
    fast = ms_deform_attn_core(value, SHAPES, locations, weights)
    slow = loop_reference(value, SHAPES, locations, weights)
    assert fast.shape == slow.shape == (2, 5, 6)
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=1e-10)


def test_core_points_outside_contribute_zero():
    value, locations, weights = random_inputs()
    locations = torch.full_like(locations, 1.6)  # every corner beyond the last pixel centre + 1
    assert ms_deform_attn_core(value, SHAPES, locations, weights).abs().max() == 0


def test_core_gradients_are_exact():
    value, locations, weights = random_inputs(seed=1)
    # Keep points away from pixel-centre lines where bilinear sampling is not differentiable.
    inputs = (value[:1, :, :1, :2].clone().requires_grad_(), locations[:1, :2, :1].clone().requires_grad_(),
              weights[:1, :2, :1].clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn_core(v, SHAPES, loc, w), inputs)


def test_module_initial_offsets_form_square_rings():
    attn = MSDeformAttn(d_model=192, n_levels=3, n_heads=6, n_points=4)
    bias = attn.sampling_offsets.bias.view(6, 3, 4, 2)
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0]]))
    torch.testing.assert_close(bias[1, 2], torch.tensor([[0.57735, 1.0], [1.1547, 2], [1.73205, 3], [2.3094, 4]]),
                               atol=1e-4, rtol=0)
    assert torch.equal(bias[:, 0], bias[:, 2])  # same pattern on every level
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0


def test_module_matches_reference_and_runs_in_bfloat16():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=12, n_levels=3, n_heads=2, n_points=3)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tokens = sum(h * w for h, w in SHAPES)
    values = torch.randn(2, tokens, 12)
    ref = level_reference_points(SHAPES)
    query = torch.randn(2, tokens, 12)
    out = attn(query, ref, values, SHAPES)

    # Reference: the same projections, then the loop sampler.
    value = attn.value_proj(values).view(2, tokens, 2, 6).double()
    offsets = attn.sampling_offsets(query).view(2, tokens, 2, 3, 3, 2).double()
    weights = attn.attention_weights(query).view(2, tokens, 2, 9).softmax(-1).view(2, tokens, 2, 3, 3).double()
    norm = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64)
    locations = ref.double()[None, :, None, None, None] + offsets / norm[None, None, None, :, None]
    expected = attn.output_proj(loop_reference(value, SHAPES, locations, weights).float())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    out_bf16 = attn.to(torch.bfloat16)(query.bfloat16(), ref, values.bfloat16(), SHAPES)
    assert out_bf16.dtype == torch.bfloat16
    assert (out_bf16.float() - out).abs().max() < 0.1 * out.abs().max()


def test_reference_points_are_pixel_centres():
    ref = level_reference_points([(2, 4), (1, 1)])
    torch.testing.assert_close(ref[:4], torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]]))
    torch.testing.assert_close(ref[-1], torch.tensor([0.5, 0.5]))


def test_value_width_must_divide_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=3)
