"""Model properties on the tiny config: shapes, size rules, gradients, branch independence, dtypes,
checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dataset import load_dataset
from dataset.errors import InputError
from networks import (
    build_model,
    config_from_dict,
    config_to_dict,
    get_config,
    get_tiny_config,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from networks.encoder_decoder import resize_position_table


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(get_tiny_config())


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (64, 96), (96, 32)])
def test_output_shapes(tiny_model, size):
    tiny_model.eval()
    with torch.no_grad():
        vit, cnn = tiny_model(torch.randn(2, 4, *size))
    assert vit.shape == cnn.shape == (2, 5, *size)
    assert torch.isfinite(vit).all() and torch.isfinite(cnn).all()


@pytest.mark.parametrize("size", [(48, 64), (64, 100), (16, 16)])
def test_unsupported_sizes_raise_a_clear_error(tiny_model, size):
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny_model(torch.randn(1, 4, *size))


def test_wrong_band_count_is_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        tiny_model(torch.randn(1, 3, 64, 64))


def dual_loss(vit, cnn, target):
    return 0.5 * F.cross_entropy(cnn, target, ignore_index=0) + 0.5 * F.cross_entropy(vit, target, ignore_index=0)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(1)
    config = get_tiny_config()
    config.aux_head.enabled = True
    model = build_model(config).train()
    # The published init gates some paths shut (injector gamma = 0, zero MSDA offset/attention
    # weights), which gives their inputs exactly zero gradient; open the gates first.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vit, cnn, aux = model(torch.randn(2, 4, 64, 64), return_aux=True)
    target = torch.randint(1, 5, (2, 64, 64))
    (dual_loss(vit, cnn, target) + 0.4 * F.cross_entropy(aux, target, ignore_index=0)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"zero gradient for {zero}"


def test_cnn_branch_never_sees_the_transformer(tiny_model):
    tiny_model.train()
    tiny_model.zero_grad()
    _, cnn = tiny_model(torch.randn(2, 4, 64, 64))
    cnn.sum().backward()
    for name, p in tiny_model.named_parameters():
        if name.startswith(("backbone.", "decode_head.", "adjust_channel_conv")):
            assert p.grad is None or p.grad.abs().sum() == 0, name
    assert tiny_model.cnn_encoder.startconv.weight.grad.abs().sum() > 0
    assert tiny_model.position_embeddings.grad.abs().sum() > 0
    tiny_model.zero_grad()


def test_bfloat16_autocast_on_cpu(tiny_model):
    tiny_model.eval()
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        vit32, cnn32 = tiny_model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            vit, cnn = tiny_model(x)
    assert vit.dtype == torch.bfloat16 and cnn.dtype == torch.bfloat16
    assert torch.isfinite(vit.float()).all() and torch.isfinite(cnn.float()).all()
    assert (vit.float().argmax(1) == vit32.argmax(1)).float().mean() > 0.8


def test_fused_attention_matches_explicit_path(tiny_model):
    config = get_tiny_config()
    config.vit.fused_attention = True
    fused = build_model(config).eval()
    fused.load_state_dict(tiny_model.state_dict())
    tiny_model.eval()
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[0], tiny_model(x)[0], atol=1e-5, rtol=1e-4)


def test_position_table_is_resized_bicubically_only_when_needed():
    table = torch.randn(1, 16, 8)
    assert resize_position_table(table, (4, 4), (4, 4)) is table
    resized = resize_position_table(table, (4, 4), (6, 2))
    assert resized.shape == (1, 12, 8)
    as_map = table.reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(as_map, size=(6, 2), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized, expected.permute(0, 2, 3, 1).reshape(1, 12, 8))


def test_unused_published_modules_are_not_built(tiny_model):
    names = {n for n, _ in tiny_model.named_modules()}
    assert not any(n.startswith(("backbone.spm.", "backbone.patch_embed", "decoder_cup.conv3")) for n in names)
    assert "backbone.spm2" in names and tiny_model.auxiliary_head is None
    with pytest.raises(ValueError, match="aux_head.enabled"):
        tiny_model(torch.randn(1, 4, 32, 32), return_aux=True)


def test_normal_width_128_runs():
    config = get_config("vcnet_normal")
    model = build_model(config).eval()
    assert sum(p.numel() for p in model.cnn_encoder.parameters()) == 42_858_718
    with torch.no_grad():
        vit, cnn = model(torch.randn(1, 4, 32, 32))
    assert vit.shape == cnn.shape == (1, 5, 32, 32)


def test_config_round_trip():
    config = get_tiny_config()
    restored = config_from_dict(config_to_dict(config))
    assert config_to_dict(restored) == config_to_dict(config)
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("huge")


def test_checkpoint_round_trip(tmp_path, tiny_model):
    path = str(tmp_path / "model.pth")
    save_checkpoint(path, model=tiny_model, model_config=get_tiny_config(), dataset=load_dataset("sample"), epoch=3)
    assert read_checkpoint(path)["epoch"] == 3
    loaded = load_model(path)
    assert not loaded.training and loaded.dataset.name == "sample" and loaded.config.name == "tiny"
    tiny_model.eval()
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        for a, b in zip(loaded(x), tiny_model(x)):
            assert torch.equal(a, b)
    assert not [p for p in tmp_path.iterdir() if p.name != "model.pth"], "temporary file left behind"


def test_checkpoint_digest_is_of_the_bytes_loaded_even_if_the_file_is_replaced(tmp_path, tiny_model, monkeypatch):
    import hashlib
    import os

    from dataset.files import file_sha256

    path, other = str(tmp_path / "model.pth"), str(tmp_path / "other.pth")
    for where, epoch in ((path, 3), (other, 4)):
        save_checkpoint(where, model=tiny_model, model_config=get_tiny_config(), dataset=load_dataset("sample"),
                        epoch=epoch)
    first = file_sha256(path)
    torch_load = torch.load

    def replaced_while_loading(*args, **kwargs):  # another run renames a new checkpoint into place meanwhile
        os.replace(other, path)
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", replaced_while_loading)
    digest = hashlib.sha256()
    payload = read_checkpoint(path, digest=digest)
    assert payload["epoch"] == 3 and digest.hexdigest() == first != file_sha256(path)


class NotPlainData:
    pass


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        read_checkpoint(str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        read_checkpoint(str(garbage))
    published = tmp_path / "published.pth"
    torch.save({"cnn_encoder.startconv.weight": torch.zeros(1)}, published)
    with pytest.raises(InputError, match="networks.convert_published"):
        read_checkpoint(str(published))
    pickled = tmp_path / "pickled.pth"
    torch.save({"format": "vcnet-checkpoint", "obj": NotPlainData()}, pickled)
    with pytest.raises(InputError, match="cannot read checkpoint"):
        read_checkpoint(str(pickled))


@pytest.mark.parametrize("name", ["tiny", "vcnet"])
def test_normalisation_layers_use_the_published_eps(name):
    """Spec section 1: LN eps 1e-6, GN(32) eps 1e-6, BN eps 1e-5 with momentum 0.1 and affine
    parameters; weight standardisation eps 1e-5 (docs/design.md §11)."""
    from networks.vit_seg_modeling_L2HNet import StdConv2d

    config = get_tiny_config() if name == "tiny" else get_config(name)
    config.aux_head.enabled = True
    model = build_model(config)
    expected = {nn.LayerNorm: 1e-6, nn.GroupNorm: 1e-6, nn.BatchNorm2d: 1e-5, StdConv2d: 1e-5}
    found = {kind: 0 for kind in expected}
    wrong = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm | StdConv2d):
            kind = type(module)
            assert kind in expected, f"{module_name}: unexpected normalisation {kind.__name__}"
            found[kind] += 1
            if module.eps != expected[kind]:
                wrong.append(f"{module_name} ({kind.__name__}) eps {module.eps}")
            if kind is nn.BatchNorm2d and (module.momentum != 0.1 or not module.affine):
                wrong.append(f"{module_name} momentum {module.momentum}, affine {module.affine}")
            if kind is nn.GroupNorm and name == "vcnet" and module.num_groups != 32:
                wrong.append(f"{module_name} {module.num_groups} groups")
    assert not wrong, wrong
    assert all(found.values()), found  # every kind is really there
