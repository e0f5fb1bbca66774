"""Initialise the transformer blocks from a DeiT-tiny ImageNet checkpoint (spec section 6.6).

The checkpoint is a timm-layout state_dict (``blocks.{i}.norm1.weight``, ...), optionally wrapped
in ``{"model": ...}``. Only the blocks' norm1/attn/norm2/mlp tensors are used: everything else
(class token, patch embedding, position table, final norm, classifier) has no counterpart in VCNet
and is reported as skipped. Layer-scale gammas stay at their initial value.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from dataset.errors import InputError

BLOCK_PREFIX = "backbone."


def load_deit_weights(model: nn.Module, path: str) -> dict[str, list[str]]:
    """Copy DeiT-tiny block weights into ``model.backbone.blocks``.

    Returns:
        ``{"loaded": [...], "skipped": [...], "not_initialised": [...]}``: checkpoint tensors
        copied, checkpoint tensors not used (with the reason), and block tensors of the model
        that the checkpoint did not provide.

    Raises:
        InputError: missing or unreadable file, or a file with no usable block tensor.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: pretrained checkpoint not found")
    try:
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: cannot read pretrained checkpoint ({str(exc).splitlines()[0]})") from None
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a state_dict (expected a dict of tensors, optionally under 'model')")
    module = getattr(model, "module", model)
    targets = module.state_dict()
    loaded, skipped = [], []
    with torch.no_grad():
        for key, tensor in state.items():
            name = BLOCK_PREFIX + key
            if not key.startswith("blocks.") or name not in targets:
                skipped.append(f"{key} (no counterpart in VCNet)")
            elif tuple(targets[name].shape) != tuple(tensor.shape):
                skipped.append(f"{key} (shape {tuple(tensor.shape)} != {tuple(targets[name].shape)})")
            else:
                targets[name].copy_(tensor.to(targets[name].dtype))
                loaded.append(key)
    if not loaded:
        raise InputError(f"{path}: no tensor matches the transformer blocks (is it a DeiT-tiny checkpoint?)")
    block_keys = [k[len(BLOCK_PREFIX):] for k in targets if k.startswith(BLOCK_PREFIX + "blocks.")]
    not_initialised = sorted(set(block_keys) - set(loaded))
    return {"loaded": loaded, "skipped": skipped, "not_initialised": not_initialised}
