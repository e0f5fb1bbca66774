"""Initialise the transformer blocks from a DeiT-tiny ImageNet checkpoint (docs/design.md §6.6).

The checkpoint is a timm-layout state_dict (``blocks.{i}.norm1.weight``, ...), optionally wrapped
in ``{"model": ...}``. Only the blocks' norm1/attn/norm2/mlp tensors are used: everything else
(class token, patch embedding, position table, final norm, classifier) has no counterpart in VCNet
and is reported as skipped. Layer-scale gammas stay at their initial value.

``--pretrained`` takes a file path or a well-known name (:data:`KNOWN_WEIGHTS`). A name is
downloaded once into the torch hub cache (``$TORCH_HOME/hub/checkpoints``, by default
``~/.cache/torch/hub/checkpoints``) and its sha256 is checked, on download and on every later use.
"""

from __future__ import annotations

import os
import urllib.error
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dataset.errors import InputError
from dataset.files import file_sha256

BLOCK_PREFIX = "backbone."


@dataclass(frozen=True)
class WeightsFile:
    """A published checkpoint: where it is downloaded from and the leading hex digits of its sha256.

    The hash prefix follows the torch hub convention of a ``name-<prefix>.pth`` file name (the one
    ``torch.hub.load_state_dict_from_url(..., check_hash=True)`` checks).
    """

    url: str
    sha256_prefix: str

    @property
    def file_name(self) -> str:
        return os.path.basename(self.url)


#: Well-known ``--pretrained`` names. DeiT-tiny is the ImageNet checkpoint of the DeiT release
#: (facebookresearch/deit, ``deit_tiny_patch16_224``) that the published recipe starts from.
KNOWN_WEIGHTS = {
    "deit_tiny_patch16_224": WeightsFile("https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth",
                                         "a1311bcf"),
}


def known_weights(ref: str) -> WeightsFile | None:
    """The :data:`KNOWN_WEIGHTS` entry that ``ref`` names (by name or by its file name), or None."""
    return KNOWN_WEIGHTS.get(ref) or next((w for w in KNOWN_WEIGHTS.values() if w.file_name == ref), None)


def resolve_pretrained(ref: str, progress: bool = True) -> str:
    """Local path of the ``--pretrained`` checkpoint ``ref``: an existing file as it is, else a
    well-known name, downloaded into the torch hub cache if it is not there with the right checksum.

    Raises:
        InputError: an unknown name that is no file, a failed download, or a checksum mismatch
            (the downloaded file is then not kept).
    """
    if os.path.isfile(ref):
        return ref
    weights = known_weights(ref)
    if weights is None:
        raise InputError(f"{ref}: pretrained checkpoint not found (give a file path or one of {sorted(KNOWN_WEIGHTS)})")
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    target = os.path.join(folder, weights.file_name)
    if os.path.isfile(target) and file_sha256(target).startswith(weights.sha256_prefix):
        return target
    os.makedirs(folder, exist_ok=True)
    offline = (f"without network, download {weights.url} elsewhere and pass its path to --pretrained, or "
               f"put it in {folder}")
    try:
        torch.hub.download_url_to_file(weights.url, target, hash_prefix=weights.sha256_prefix, progress=progress)
    except RuntimeError as exc:  # torch hub's hash mismatch; it has deleted the partial file
        raise InputError(f"{weights.url}: the download fails its sha256 check ({exc}); nothing was kept") from None
    except (OSError, urllib.error.URLError) as exc:
        raise InputError(f"{weights.url}: cannot download ({exc}); {offline}") from None
    return target


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
