"""Multi-scale deformable attention against a slow, loop-by-loop bilinear reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import networks.ms_deform_attn as ms_deform_attn_module
from networks.ms_deform_attn import MSDeformAttn, level_reference_points, ms_deform_attn_core

SHAPES = [(4, 5), (2, 3), (3, 1)]  # non-square levels, one of width 1


def loop_reference(value, shapes, locations, weights):
    """Bilinear sampling written out: pixel (x*W - 0.5, y*H - 0.5), zero outside the map."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads * dim, dtype=value.dtype, device=value.device)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                acc = torch.zeros(dim, dtype=value.dtype, device=value.device)
                for lvl, (height, width) in enumerate(shapes):
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0].item() * width - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(dim, dtype=value.dtype, device=value.device)
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


@pytest.mark.cuda
def test_core_matches_loop_reference_on_cuda():
    """The same check with CUDA inputs (the loop reference follows its inputs' device)."""
    value, locations, weights = (t.cuda() for t in random_inputs())
    fast = ms_deform_attn_core(value, SHAPES, locations, weights)
    assert fast.is_cuda
    torch.testing.assert_close(fast, loop_reference(value, SHAPES, locations, weights), atol=1e-12, rtol=1e-10)


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


def _random_module(d_model=12, heads=2, points=3):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=d_model, n_levels=3, n_heads=heads, n_points=points)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tokens = sum(h * w for h, w in SHAPES)
    return attn, torch.randn(2, tokens, d_model), torch.randn(2, tokens, d_model), level_reference_points(SHAPES)


def test_sampling_stays_float32_under_bfloat16(monkeypatch):
    """Autocast (here the CPU's) or a bfloat16 module: offsets, grid and sampling in float32."""
    seen = []
    real = F.grid_sample

    def spy(value, grid, *args, **kwargs):
        seen.append((value.dtype, grid.dtype))
        return real(value, grid, *args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", spy)
    attn, query, values, ref = _random_module()
    expected = attn(query, ref, values, SHAPES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_out = attn(query, ref, values, SHAPES)
    bf16_out = attn.to(torch.bfloat16)(query.bfloat16(), ref, values.bfloat16(), SHAPES)
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert bf16_out.dtype == torch.bfloat16
    for out in (autocast_out, bf16_out):
        assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_offsets_are_float32_under_autocast(monkeypatch):
    """The sampling-offset projection runs in float32 even when autocast makes Linear bfloat16."""
    attn, query, values, ref = _random_module()
    captured = {}

    def spy(value, shapes, locations, weights):
        captured["locations"], captured["weights"] = locations, weights
        return ms_deform_attn_core(value, shapes, locations, weights)

    monkeypatch.setattr(ms_deform_attn_module, "ms_deform_attn_core", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(query, ref, values, SHAPES)
    offsets = attn.sampling_offsets(query).view(2, -1, 2, 3, 3, 2)
    norm = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32)
    exact = ref[None, :, None, None, None] + offsets / norm[None, None, None, :, None]
    assert captured["locations"].dtype == captured["weights"].dtype == torch.float32
    torch.testing.assert_close(captured["locations"], exact, atol=1e-6, rtol=0)


def test_level_normaliser_is_made_once(monkeypatch):
    """No host-to-device tensor per forward: the (W, H) table is built at the first call only."""
    attn, query, values, ref = _random_module()
    first = attn(query, ref, values, SHAPES)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    again = attn(query, ref, values, SHAPES)
    assert made == [] and torch.equal(first, again)


# --- the Triton kernel (networks/ms_deform_attn_triton.py) ---------------------------------------

_INTERPRETED = """
import json, sys, torch
from networks.ms_deform_attn import ms_deform_attn_core
from networks.ms_deform_attn_triton import triton_core
shapes = json.loads(sys.argv[1])
gaps = []
for levels, dtype in [(shapes, torch.float32), (shapes, torch.bfloat16), (shapes[:1], torch.float32)]:
    g = torch.Generator().manual_seed(len(levels))
    tokens = sum(h * w for h, w in levels)
    value = torch.randn(2, tokens, 3, 5, generator=g).to(dtype)  # a head width that is not a power of 2
    locations = torch.rand(2, 37, 3, len(levels), 4, 2, generator=g) * 1.6 - 0.3  # 37: two blocks, the 2nd partial
    weights = torch.rand(2, 37, 3, len(levels), 4, generator=g).softmax(-1)
    expected = ms_deform_attn_core(value, levels, locations, weights)
    got = triton_core(value, levels, locations, weights)
    gaps.append([list(got.shape) == list(expected.shape), got.dtype == torch.float32,
                 (got - expected).abs().max().item(), expected.abs().max().item()])
print(json.dumps(gaps))
"""


def test_triton_kernel_matches_the_reference_in_triton_s_interpreter():
    """The kernel itself, run on the CPU by Triton's interpreter (it needs TRITON_INTERPRET=1 before Triton is
    imported: a process of its own): three levels and one, float32 and bfloat16 values, points outside."""
    pytest.importorskip("triton", reason="Triton is not installed")
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED, json.dumps(SHAPES)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    gaps = json.loads(done.stdout.strip().splitlines()[-1])
    for same_shape, float32, gap, scale in gaps:
        assert same_shape and float32 and scale > 0.5
        assert gap < 1e-5  # float32 sums in another order than grid_sample's


def test_triton_setting_runs_the_reference_where_the_kernel_cannot(monkeypatch):
    """On the CPU (and under autograd, and without Triton) ``kernel='triton'`` is the reference, bit for bit."""
    attn, query, values, ref = _random_module()
    expected = attn(query, ref, values, SHAPES)
    attn.kernel = "triton"
    torch.testing.assert_close(attn(query, ref, values, SHAPES), expected, rtol=0, atol=0)
    monkeypatch.setattr(ms_deform_attn_module.ms_deform_attn_triton, "available", lambda: False)
    with torch.no_grad():
        torch.testing.assert_close(attn(query, ref, values, SHAPES), expected, rtol=0, atol=0)


def test_the_kernel_setting_reaches_every_deformable_attention():
    from networks import build_model, get_config

    config = get_config("tiny")
    config.vit.deform_attn_kernel = "triton"
    kernels = {m.kernel for m in build_model(config).modules() if isinstance(m, MSDeformAttn)}
    assert kernels == {"triton"}
    assert {m.kernel for m in build_model(get_config("tiny")).modules() if isinstance(m, MSDeformAttn)} == {"pytorch"}
    config.vit.deform_attn_kernel = "cuda"
    with pytest.raises(ValueError, match="deform_attn_kernel"):
        build_model(config)


@pytest.mark.cuda
def test_triton_kernel_agrees_with_the_reference_on_cuda():
    """Compiled for the GPU: inference agrees to float32 rounding; under autograd the reference runs."""
    pytest.importorskip("triton", reason="Triton is not installed")
    attn, query, values, ref = (t.cuda() for t in _random_module())
    expected = attn(query, ref, values, SHAPES)
    attn.kernel = "triton"
    with torch.no_grad():
        fused = attn(query, ref, values, SHAPES)
    assert (fused - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(attn(query, ref, values, SHAPES), expected, rtol=0, atol=0)
