"""Project checkpoints: one file with the model config, the dataset definition and the weights.

Layout (plain data only, so it loads with ``torch.load(..., weights_only=True)`` and a downloaded
checkpoint cannot run code)::

    {
      "format": "vcnet-checkpoint", "version": 1,
      "model_config": {...},          # networks.config.config_to_dict
      "dataset": {...},               # dataset.DatasetDefinition.to_dict
      "state_dict": {...},            # model weights (published key names, unused keys dropped)
      # written by training, optional:
      "optimizer": {...}, "epoch": int, "step": int, "rng": {...}, "train_args": {...}
    }
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from dataset import DatasetDefinition, load_dataset
from dataset.errors import InputError
from dataset.files import atomic_output
from networks.config import config_from_dict, config_to_dict

CHECKPOINT_FORMAT = "vcnet-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str, *, model: torch.nn.Module, model_config: Any, dataset: DatasetDefinition | Mapping,
                    **extra: Any) -> None:
    """Write a checkpoint atomically (temporary file, then rename).

    Args:
        path: destination ``.pth``.
        model: the model; a DistributedDataParallel wrapper is unwrapped.
        model_config: ConfigDict or its plain dict.
        dataset: definition (or its dict) the model was trained for.
        extra: optional plain-data entries (optimizer state, epoch, step, rng, train_args, ...).
    """
    module = getattr(model, "module", model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": config_to_dict(model_config) if hasattr(model_config, "to_dict") else dict(model_config),
        "dataset": dataset.to_dict() if isinstance(dataset, DatasetDefinition) else dict(dataset),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }
    payload.update(extra)
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a project checkpoint (no pickled code is executed).

    Raises:
        InputError: missing file, unreadable file, or a file that is not a project checkpoint
            (a bare published state_dict gets a hint to run ``networks.convert_published``).
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot read checkpoint ({reason})") from None
    if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
        hint = ""
        if isinstance(payload, Mapping) and any(str(k).startswith(("cnn_encoder.", "backbone.")) for k in payload):
            hint = "; it looks like a published VCNet state_dict: convert it with " \
                   "`python -m networks.convert_published IN.pth OUT.pth`"
        raise InputError(f"{path}: not a VCNet project checkpoint{hint}")
    if int(payload.get("version", 0)) > CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint version {payload['version']} is newer than this code supports")
    for key in ("model_config", "dataset", "state_dict"):
        if key not in payload:
            raise InputError(f"{path}: checkpoint lacks '{key}'")
    return dict(payload)


def model_from_checkpoint(payload: Mapping[str, Any], device: str | torch.device = "cpu",
                          where: str = "checkpoint") -> torch.nn.Module:
    """Build the model a checkpoint describes and load its weights strictly (eval mode)."""
    from networks.encoder_decoder import build_model  # local: avoid an import cycle

    config = config_from_dict(payload["model_config"])
    model = build_model(config)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise InputError(
            f"{where}: weights do not match the model config (missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]})"
        )
    model.config = config
    model.dataset = load_dataset(payload["dataset"])
    return model.to(device).eval()


def load_model(path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Return the model of a project checkpoint, in eval mode on ``device``.

    The model carries ``model.config`` (ConfigDict) and ``model.dataset`` (DatasetDefinition),
    so mapping needs nothing but the file.
    """
    return model_from_checkpoint(read_checkpoint(path), device=device, where=path)
