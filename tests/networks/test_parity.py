"""Full-size model: numerical parity with the published VCNet, parameter counts, converter, DeiT init.

The published weights are rebuilt by the rule of tests/data/reference/README.md, converted with
``networks.convert_published``, loaded with ``networks.load_model`` and run on the fixture input.
"""

import numpy as np
import pytest
import torch

from dataset.errors import InputError
from networks import build_model, get_config, load_deit_weights, load_model
from networks.convert_published import convert_state_dict
from networks.convert_published import main as convert_main
from tests.networks.published_weights import FIXTURE_NPZ, published_state_dict

pytestmark = pytest.mark.slow

# Largest absolute logit difference to the fixture: a few times the float32 error measured here.
VIT_TOLERANCE = 2e-5
CNN_TOLERANCE = 5e-6


@pytest.fixture(scope="module")
def published():
    return published_state_dict()


@pytest.fixture(scope="module")
def converted_path(published, tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    torch.save(published, folder / "published.pth")
    assert convert_main([str(folder / "published.pth"), str(folder / "vcnet.pth")]) == 0
    return str(folder / "vcnet.pth")


@pytest.fixture(scope="module")
def model(converted_path):
    return load_model(converted_path)


def test_reference_rule_reproduces_the_published_sums(published):
    sums = {
        "cnn_encoder.startconv.weight": -15.372529,
        "backbone.interactions.3.cti_tov.gamma": -0.533757,
        "backbone.blocks.0.attn.qkv.weight": 39.626019,
        "decode_head.conv_seg.bias": 0.009856,
        "decoder_cup.conv2.1.running_var": 672.046991,
    }
    for key, expected in sums.items():
        assert published[key].double().sum().item() == pytest.approx(expected, abs=2e-6), key
    assert len(published) == 1008


def test_parity_with_the_published_model(model):
    fixture = np.load(FIXTURE_NPZ)
    with torch.no_grad():
        vit, cnn = model(torch.from_numpy(fixture["input"]))
    vit_diff = (vit - torch.from_numpy(fixture["vit_logits"])).abs().max().item()
    cnn_diff = (cnn - torch.from_numpy(fixture["cnn_logits"])).abs().max().item()
    # Measured on CPU (1 and 2 threads): vit 3.5e-6 to 3.6e-6, cnn 0.95e-6 to 1.0e-6. A LayerNorm
    # eps of 1e-5 instead of 1e-6 alone moves the vit logits by about 4.7e-4.
    assert vit_diff <= VIT_TOLERANCE and cnn_diff <= CNN_TOLERANCE, (vit_diff, cnn_diff)


#: On CUDA, TF32 convolutions (PyTorch's default on Ampere and later) and other kernels move the
#: logits by about 1e-3; float32 CPU parity is the tests above.
GPU_TOLERANCE = 2e-3


@pytest.mark.cuda
def test_parity_on_gpu(model):
    fixture = np.load(FIXTURE_NPZ)
    try:
        with torch.no_grad():
            vit, cnn = model.cuda()(torch.from_numpy(fixture["input"]).cuda())
    finally:
        model.cpu()
    vit_diff = (vit.cpu() - torch.from_numpy(fixture["vit_logits"])).abs().max().item()
    cnn_diff = (cnn.cpu() - torch.from_numpy(fixture["cnn_logits"])).abs().max().item()
    print(f"GPU parity: vit {vit_diff:.2e}, cnn {cnn_diff:.2e}")
    assert vit_diff <= GPU_TOLERANCE and cnn_diff <= GPU_TOLERANCE, (vit_diff, cnn_diff)


def test_parameter_counts(model, published):
    total = sum(p.numel() for p in model.parameters())
    assert total == 97_071_258
    parts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    assert parts["cnn_encoder"] == 38_382_447
    assert parts["decode_head"] == 27_546_117
    assert parts["decoder_cup"] == 20_366_594 - 13_826  # without the dead conv3
    assert parts["backbone"] == 11_826_607 - 1_172_096 - 147_648 - 37_824 - 15
    assert model.position_embeddings.numel() == 37_632
    published_params = sum(v.numel() for k, v in published.items()
                           if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert published_params == 98_887_088


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (320, 256)])
def test_full_size_shapes(model, size):
    with torch.no_grad():
        vit, cnn = model(torch.randn(1, 4, *size))
    assert vit.shape == cnn.shape == (1, 5, *size)


def test_converter_with_aux_head_keeps_it(published):
    state, config, dropped = convert_state_dict(published, with_aux_head=True)
    assert config.aux_head.enabled
    assert sum(v.numel() for k, v in state.items() if k.startswith("auxiliary_head.")
               and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) == 444_421
    assert not any(k.startswith("auxiliary_head.") for k in dropped)
    assert any(k.startswith("decoder_cup.conv3.") for k in dropped)


def test_converter_lists_missing_unexpected_and_mismatched_keys(published):
    broken = dict(published)
    del broken["backbone.level_embed"]
    broken["backbone.extra.weight"] = torch.zeros(1)
    broken["decode_head.conv_seg.bias"] = torch.zeros(7)
    with pytest.raises(InputError) as info:
        convert_state_dict(broken, where="bad.pth")
    message = str(info.value)
    assert "bad.pth" in message and "\n" not in message
    assert "missing keys ['backbone.level_embed']" in message
    assert "unexpected keys ['backbone.extra.weight']" in message
    assert "decode_head.conv_seg.bias (7,) != (5,)" in message


def test_converter_cli_rejects_non_vcnet_files(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(InputError, match="not a published VCNet state_dict"):
        convert_main([str(path), str(tmp_path / "out.pth")])
    assert not (tmp_path / "out.pth").exists()


def deit_tiny_state_dict():
    """A DeiT-tiny checkpoint in timm layout (random values, real names and shapes)."""
    g = torch.Generator().manual_seed(0)
    state = {"cls_token": torch.zeros(1, 1, 192), "pos_embed": torch.zeros(1, 197, 192),
             "patch_embed.proj.weight": torch.zeros(192, 3, 16, 16), "patch_embed.proj.bias": torch.zeros(192),
             "norm.weight": torch.ones(192), "norm.bias": torch.zeros(192),
             "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}
    shapes = {"norm1.weight": (192,), "norm1.bias": (192,), "attn.qkv.weight": (576, 192), "attn.qkv.bias": (576,),
              "attn.proj.weight": (192, 192), "attn.proj.bias": (192,), "norm2.weight": (192,),
              "norm2.bias": (192,), "mlp.fc1.weight": (768, 192), "mlp.fc1.bias": (768,),
              "mlp.fc2.weight": (192, 768), "mlp.fc2.bias": (192,)}
    for i in range(12):
        for name, shape in shapes.items():
            state[f"blocks.{i}.{name}"] = torch.randn(shape, generator=g)
    return state


def test_deit_tiny_initialises_the_twelve_blocks(tmp_path):
    state = deit_tiny_state_dict()
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": state}, path)
    net = build_model(get_config("vcnet"))
    report = load_deit_weights(net, str(path))
    assert len(report["loaded"]) == 144
    assert {s.split(" ")[0] for s in report["skipped"]} == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
        "head.weight", "head.bias"}
    assert len(report["not_initialised"]) == 24 and all("gamma" in k for k in report["not_initialised"])
    assert torch.equal(net.backbone.blocks[11].mlp.fc2.weight, state["blocks.11.mlp.fc2.weight"])
    assert torch.all(net.backbone.blocks[0].gamma1 == 1)
    with pytest.raises(InputError, match="not found"):
        load_deit_weights(net, str(tmp_path / "missing.pth"))
