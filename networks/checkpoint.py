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
from dataset.files import atomic_output, feed_digest, write_failure_cause
from networks.config import config_from_dict, config_to_dict
from networks.label_model import LabelModelVote, label_model_from_state

CHECKPOINT_FORMAT = "vcnet-checkpoint"
CHECKPOINT_VERSION = 1
#: How to make a project checkpoint of published weights (said whenever a file is not one).
CONVERT_HINT = "a published VCNet state_dict is converted with `python -m networks.convert_published IN.pth OUT.pth`"


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
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a full disk as an "enforce fail"
            cause = write_failure_cause(tmp, str(exc).strip().splitlines()[0] if str(exc).strip() else "write error")
            kept = "the previous file under this name is unchanged" if os.path.exists(path) else \
                "nothing was saved under this name"
            raise InputError(f"{path}: cannot write the checkpoint ({cause}); {kept}") from None


def load_failure(exc: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in words. Torch's own message advises
    ``weights_only=False``, which runs the file's code: never pass that on to a user."""
    return "it holds Python objects, not plain data" if "Unsupported global" in str(exc) else \
        "corrupt, or not a torch file"


def read_checkpoint(path: str, map_location: str | torch.device = "cpu", digest: Any = None) -> dict[str, Any]:
    """Read and validate a project checkpoint (no pickled code is executed).

    ``digest`` (a ``hashlib`` object), if given, is fed the file's bytes from the same open file that is
    loaded, so the hash is that of the weights read even if the file is replaced meanwhile.

    Raises:
        InputError: missing file, unreadable file, or a file that is not a project checkpoint
            (a bare published state_dict gets a hint to run ``networks.convert_published``).
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found")
    try:
        with open(path, "rb") as fh:
            if digest is not None:
                feed_digest(digest, fh)
                fh.seek(0)
            payload = torch.load(fh, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from None
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise InputError(f"{path}: cannot read checkpoint: not a VCNet checkpoint ({load_failure(exc)}); "
                         f"{CONVERT_HINT}") from None
    if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
        hint = f"; {CONVERT_HINT}"
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
                          where: str = "checkpoint", label_model_weight: float | None = None) -> torch.nn.Module:
    """Build the model a checkpoint describes and load its weights strictly (eval mode).

    The model carries what mapping needs from the checkpoint: ``model.config``, ``model.dataset``,
    ``model.guided_filter``, the radius of the image-guided filter its recipe maps with (``train_args``'
    ``guided_filter``; 0 for a checkpoint written before that option, or without training settings, such as
    a converted published one), and ``model.label_model_weight``. When that weight is above 0 the model is
    the network with its run's label model voting (:class:`networks.label_model.LabelModelVote`).

    Args:
        label_model_weight: overrides the checkpoint's ``train_args``' ``label_model_weight`` (None: the
            checkpoint's, 0 when it has none; 0: the network alone).

    Raises:
        InputError: a weight above 0 for a checkpoint without a ``label_model`` (a run without
            ``--refine_labels local``), or whose label model does not fit its dataset and settings.
    """
    from networks.encoder_decoder import build_model  # local: avoid an import cycle

    config = config_from_dict(payload["model_config"])
    network = build_model(config)
    load_weights(network, payload["state_dict"], where)
    dataset = load_dataset(payload["dataset"])
    train_args = payload.get("train_args") or {}
    weight = float((train_args.get("label_model_weight") or 0) if label_model_weight is None else label_model_weight)
    model = network
    if weight > 0:
        if "label_model" not in payload:
            raise InputError(f"{where}: --label_model_weight {weight:g} needs the run's label model, and this "
                             "checkpoint has none (trained without --refine_labels local); 0 maps with the network alone")
        try:
            label_model = label_model_from_state(payload["label_model"], dataset.bands, dataset.num_classes,
                                                 dataset.mean, dataset.std,
                                                 with_ndvi=train_args.get("refine_features") == "ndvi")
        except (RuntimeError, ValueError, KeyError, IndexError) as exc:
            raise InputError(f"{where}: its label model does not match its dataset and settings "
                             f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
                             ) from None
        model = LabelModelVote(network, label_model, weight)
    model.config = config
    model.dataset = dataset
    model.guided_filter = int(train_args.get("guided_filter") or 0)
    model.label_model_weight = weight
    return model.to(device).eval()


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Load a checkpoint's weights into the model its config builds, strictly.

    Raises:
        InputError: missing, unexpected or differently shaped tensors (e.g. weights of another
            class or band count than the checkpoint's own config says).
    """
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        shapes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise InputError(f"{where}: its weights do not match its own model config "
                         f"({shapes[0] if shapes else 'shape mismatch'}{' ...' if len(shapes) > 1 else ''})") from None
    if missing or unexpected:
        raise InputError(
            f"{where}: weights do not match the model config (missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]})"
        )


def load_model(path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Return the model of a project checkpoint, in eval mode on ``device``.

    The model carries ``model.config`` (ConfigDict), ``model.dataset`` (DatasetDefinition),
    ``model.guided_filter`` and ``model.label_model_weight`` (see :func:`model_from_checkpoint`), so mapping
    needs nothing but the file.
    """
    return model_from_checkpoint(read_checkpoint(path), device=device, where=path)
