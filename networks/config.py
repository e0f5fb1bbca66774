"""Model configurations (ml-collections ConfigDict). Every size of the model is set here.

``get_vcnet_config()`` is the published model (docs/design.md §3-4): 4 bands, 5 classes, L2HNet
width 64, ViT-tiny with four interaction stages, UPer 512, decoder 512/640/256.
``get_tiny_config()`` is a few-thousand-parameter variant with the same structure, for tests.

A checkpoint stores ``config.to_dict()``; :func:`config_from_dict` restores it, filling fields
that a newer version of the code added with their defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

CONFIG_NAMES = ("vcnet", "vcnet_normal", "tiny")
#: Input sides must be multiples of this: three token levels need an even stride-16 grid.
SIZE_MULTIPLE = 32


def get_vcnet_config() -> ml_collections.ConfigDict:
    """The published VCNet (width 64 "light" L2HNet)."""
    c = ml_collections.ConfigDict()
    c.name = "vcnet"
    c.in_channels = 4
    c.num_classes = 5
    # Chip size the position table was made for (14 x 14 rows at 224); other sizes interpolate it.
    c.img_size = 224

    c.l2hnet = ml_collections.ConfigDict()
    c.l2hnet.width = 64  # 64 "light" (published default) or 128 "normal"
    c.l2hnet.num_blocks = 7
    c.l2hnet.branch_ratio = 0.8  # 3x3 branch gets floor(0.8 * width) channels
    c.l2hnet.out_channels = (896, 1024, 1024)  # out-conv1 (s2), out-conv2 (s4), out-conv3 (s16)
    c.l2hnet.gn_groups = 32
    c.l2hnet.ws_eps = 1e-5

    c.vit = ml_collections.ConfigDict()
    c.vit.embed_dim = 192
    c.vit.depth = 12
    c.vit.num_heads = 3
    c.vit.mlp_ratio = 4.0
    c.vit.qkv_bias = True
    c.vit.layer_scale_init = 1.0
    # Published code never passes its configured 0.1 on (docs/design.md §10, defect 17).
    c.vit.drop_path_rate = 0.0
    c.vit.token_dropout = 0.1
    c.vit.interaction_indexes = ((0, 2), (3, 5), (6, 8), (9, 11))
    c.vit.deform_num_heads = 6
    c.vit.n_points = 4
    c.vit.deform_ratio = 1.0
    c.vit.cffn_ratio = 0.25
    c.vit.mrfp_ratio = 6.0  # MRFP hidden = 6 * embed_dim (1152)
    c.vit.extra_extractors = 4  # in the last stage only
    c.vit.injector_init = 0.0
    c.vit.spm_channels = 64  # spatial-prior CNN base width (inplanes)
    # Parity-exact explicit softmax(QK^T)V; set True for F.scaled_dot_product_attention.
    c.vit.fused_attention = False
    # "triton": the deformable attentions' sampling and sum in one Triton kernel on CUDA, inference only (the
    # PyTorch reference elsewhere); agrees with it to float32 rounding (docs/performance.md).
    c.vit.deform_attn_kernel = "pytorch"

    c.decoder = ml_collections.ConfigDict()
    c.decoder.head_channels = 512
    c.decoder.channels = (512, 640, 256)  # conv1 (s16), conv2 (s4), conv4 (s2 -> full)

    c.uper = ml_collections.ConfigDict()
    c.uper.channels = 512
    c.uper.pool_scales = (1, 2, 3, 6)
    c.uper.dropout = 0.1

    c.aux_head = ml_collections.ConfigDict()
    c.aux_head.enabled = False  # built, never called in the published model (docs/design.md §3.7)
    c.aux_head.channels = 256
    c.aux_head.in_index = 2
    c.aux_head.dropout = 0.1
    return c


def get_vcnet_normal_config() -> ml_collections.ConfigDict:
    """VCNet with the width-128 "normal" L2HNet (crashes in the published code; works here)."""
    c = get_vcnet_config()
    c.name = "vcnet_normal"
    c.l2hnet.width = 128
    return c


def get_tiny_config() -> ml_collections.ConfigDict:
    """Same structure, tiny sizes: for tests on 2 CPU cores with 32-64 pixel chips."""
    c = get_vcnet_config()
    c.name = "tiny"
    c.img_size = 64
    c.l2hnet.width = 8
    c.l2hnet.num_blocks = 2
    c.l2hnet.out_channels = (16, 16, 16)
    c.l2hnet.gn_groups = 4
    c.vit.embed_dim = 24
    c.vit.depth = 4
    c.vit.num_heads = 2
    c.vit.mlp_ratio = 2.0
    c.vit.interaction_indexes = ((0, 0), (1, 1), (2, 2), (3, 3))
    c.vit.deform_num_heads = 2
    c.vit.n_points = 2
    c.vit.mrfp_ratio = 2.0
    c.vit.extra_extractors = 1
    c.vit.spm_channels = 8
    c.decoder.head_channels = 16
    c.decoder.channels = (16, 16, 8)
    c.uper.channels = 16
    c.aux_head.channels = 8
    return c


_BUILDERS = {
    "vcnet": get_vcnet_config,
    "vcnet_normal": get_vcnet_normal_config,
    "tiny": get_tiny_config,
}


def get_config(name: str = "vcnet") -> ml_collections.ConfigDict:
    """Return a fresh config by name (one of ``CONFIG_NAMES``)."""
    try:
        return _BUILDERS[name]()
    except KeyError:
        raise ValueError(f"unknown model config {name!r}: choose one of {sorted(_BUILDERS)}") from None


def _merge(base: ml_collections.ConfigDict, data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        if key in base and isinstance(base[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
            _merge(base[key], value)
        else:
            if isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            with base.ignore_type():
                base[key] = value


def config_from_dict(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Rebuild a config from its plain-dict form (as stored in a checkpoint)."""
    config = get_vcnet_config()
    _merge(config, data)
    return config


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Plain data (dicts, lists, numbers, strings) safe for ``torch.load(weights_only=True)``."""

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config.to_dict())
