"""Convert a published VCNet state_dict into a project checkpoint (docs/design.md §9).

Usage::

    python -m networks.convert_published IN.pth OUT.pth [--dataset Chesapeake] [--with_aux_head]

The published checkpoint is a bare ``model.state_dict()`` (published key names, no ``module.``
prefix; a ``module.`` prefix or a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is accepted).
Keys of modules that take no part in the forward pass are dropped; any other missing or unexpected
key, or a shape mismatch, is an error that lists them. The L2HNet width (64 or 128) is read from the
weights. The output carries the model config and the dataset definition, so
``test.py --checkpoint OUT.pth`` needs nothing else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dataset import load_dataset
from dataset.errors import InputError, run_cli
from networks.checkpoint import load_failure, save_checkpoint
from networks.config import get_vcnet_config
from networks.encoder_decoder import build_model

# Modules of the published model that never run (docs/design.md §3.6-3.8 and §10, defect 18).
UNUSED_PREFIXES = (
    "backbone.pos_embed",
    "backbone.patch_embed.",
    "backbone.channel_conv.",
    "backbone.spm.",
    "decoder_cup.conv3.",
)
AUX_PREFIX = "auxiliary_head."


def unwrap_state_dict(payload: Any, where: str = "checkpoint") -> dict[str, Tensor]:
    """Return the bare state_dict of a published checkpoint (wrappers and ``module.`` removed)."""
    state = payload
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{where}: not a state_dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def convert_state_dict(published: Mapping[str, Tensor], with_aux_head: bool = False,
                       where: str = "checkpoint") -> tuple[dict[str, Tensor], Any, list[str]]:
    """Map a published state_dict onto this project's model.

    Returns:
        ``(state_dict, model_config, dropped_keys)``.

    Raises:
        InputError: listing missing keys, unexpected keys and shape mismatches.
    """
    if "cnn_encoder.startconv.weight" not in published or "segmentation_head.0.weight" not in published:
        raise InputError(f"{where}: not a published VCNet state_dict (no cnn_encoder.startconv / segmentation_head)")
    config = get_vcnet_config()
    start = published["cnn_encoder.startconv.weight"]
    config.l2hnet.width = int(start.shape[0])
    config.in_channels = int(start.shape[1])
    config.num_classes = int(published["segmentation_head.0.weight"].shape[0])
    config.aux_head.enabled = with_aux_head
    drop = UNUSED_PREFIXES if with_aux_head else UNUSED_PREFIXES + (AUX_PREFIX,)
    dropped = [k for k in published if k.startswith(drop)]
    state = {k: v for k, v in published.items() if not k.startswith(drop)}
    expected = build_model(config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches {mismatched}")
        raise InputError(f"{where}: does not match VCNet: " + "; ".join(parts))
    return {k: state[k].clone() for k in expected}, config, dropped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m networks.convert_published", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="published VCNet state_dict (.pth)")
    parser.add_argument("output", help="project checkpoint to write (.pth)")
    parser.add_argument("--dataset", default="Chesapeake",
                        help="dataset definition the weights were trained for (name or JSON path; default Chesapeake)")
    parser.add_argument("--with_aux_head", action="store_true",
                        help="keep the (never used) auxiliary FCN head instead of dropping it")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.dataset)
    try:
        payload = torch.load(args.input, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{args.input}: file not found") from None
    except Exception as exc:
        raise InputError(f"{args.input}: cannot read checkpoint ({load_failure(exc)})") from None
    state, config, dropped = convert_state_dict(unwrap_state_dict(payload, args.input), args.with_aux_head,
                                                args.input)
    if config.num_classes != dataset.num_classes or config.in_channels != dataset.num_bands:
        raise InputError(
            f"{args.input}: weights have {config.in_channels} bands / {config.num_classes} classes, dataset "
            f"{dataset.name!r} has {dataset.num_bands} / {dataset.num_classes}"
        )
    model = build_model(config)
    model.load_state_dict(state)
    save_checkpoint(args.output, model=model, model_config=config, dataset=dataset,
                    source={"published_state_dict": args.input, "dropped_keys": dropped})
    print(f"wrote {args.output}: {len(state)} tensors kept, {len(dropped)} unused tensors dropped "
          f"(L2HNet width {config.l2hnet.width}, {config.num_classes} classes, dataset {dataset.name})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
