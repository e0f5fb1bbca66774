"""The VCNet model: L2HNet CNN branch + ViT_FuseX transformer branch, UPer and cascaded decoders.

Public API::

    from networks import build_model, get_config, load_model, save_checkpoint
    model = build_model(get_config("vcnet"))     # published model, random init
    vit_logits, cnn_logits = model(x)            # x: normalised (B, bands, H, W), H, W % 32 == 0
    model = load_model("epoch_99.pth")           # project checkpoint -> eval-mode model

The names are imported on first use, so ``networks.config`` (what the command-line options need)
loads without torch and ``--help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "EncoderDecoder": "networks.encoder_decoder",
    "build_model": "networks.encoder_decoder",
    "config_from_dict": "networks.config",
    "config_to_dict": "networks.config",
    "get_config": "networks.config",
    "get_tiny_config": "networks.config",
    "get_vcnet_config": "networks.config",
    "load_deit_weights": "networks.pretrained",
    "load_model": "networks.checkpoint",
    "load_weights": "networks.checkpoint",
    "model_from_checkpoint": "networks.checkpoint",
    "read_checkpoint": "networks.checkpoint",
    "resolve_pretrained": "networks.pretrained",
    "save_checkpoint": "networks.checkpoint",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'networks' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
