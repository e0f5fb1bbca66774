"""The run folder (``--out_dir``): checkpoints, what they hold, and the checks that make resume exact.

Layout: ``last.pth`` after every epoch (what ``--resume`` reads), ``epoch_N.pth`` every
``--save_interval`` epochs and after the last, ``train.log``, ``tensorboard/`` and ``val/`` (the
maps of the last validation). Every checkpoint is written atomically.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import torch

from dataset import DatasetDefinition
from dataset.errors import InputError
from dataset.files import atomic_output
from networks import read_checkpoint, save_checkpoint
from networks.config import config_to_dict
from training.options import SCHEDULE_OPTIONS, TrainOptions

#: Entries a checkpoint must have to continue a run from it.
TRAINING_STATE = ("optimizer", "epoch", "step", "total_steps", "train_args")


class RunFolder:
    """Paths of one run and the writing of its checkpoints."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.last = os.path.join(path, "last.pth")
        self.val = os.path.join(path, "val")

    def epoch_checkpoint(self, epoch: int) -> str:
        return os.path.join(self.path, f"epoch_{epoch}.pth")

    def refuse_existing_run(self, options: TrainOptions) -> None:
        """A new run must not silently replace one that is saved here."""
        if os.path.exists(self.last) and not options.resume and not options.overwrite:
            raise InputError(f"{self.last}: a run is already saved here; continue it with --resume {self.last}, "
                             f"or pass --overwrite, or choose another --out_dir")

    def save(self, epoch: int, *, keep_epoch: bool, model: torch.nn.Module, model_config: Any,
             dataset: DatasetDefinition, state: dict[str, Any]) -> list[str]:
        """Write ``last.pth`` and, if ``keep_epoch``, a copy as ``epoch_{epoch}.pth``. Returns the paths."""
        save_checkpoint(self.last, model=model, model_config=model_config, dataset=dataset, **state)
        if not keep_epoch:
            return [self.last]
        path = self.epoch_checkpoint(epoch)
        with atomic_output(path) as tmp:
            shutil.copyfile(self.last, tmp)
        return [path, self.last]


def training_state(*, options: TrainOptions, optimizer: torch.optim.Optimizer, epoch: int, step: int,
                   total_steps: int, steps_per_epoch: int, tiles: list[str], device: torch.device,
                   metrics: dict[str, Any]) -> dict[str, Any]:
    """Plain-data entries a training checkpoint adds to the model, config and dataset."""
    return {
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "train_args": dataclasses.asdict(options),
        "tiles": tiles,
        # Every stream is reseeded from (seed, epoch, ...) at each epoch start, which is what makes
        # resume exact; the generator states at the end of the epoch are kept for inspection.
        "rng": {"seed": options.seed, "torch": "reseeded per (seed, epoch, rank) at each epoch start",
                "sampling": "numpy generators of (seed, epoch, tile)",
                "torch_cpu_state": torch.get_rng_state(),
                "torch_cuda_states": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None},
    }


def read_resume(options: TrainOptions, dataset: DatasetDefinition) -> dict[str, Any] | None:
    """The ``--resume`` checkpoint, checked against this run's settings and dataset (None without it)."""
    if not options.resume:
        return None
    payload = read_checkpoint(options.resume)
    missing = [k for k in TRAINING_STATE if k not in payload]
    if missing:
        raise InputError(f"{options.resume}: not a training checkpoint (lacks {missing}); "
                         "to start from its weights use a fresh run")
    saved = payload["train_args"]
    for name in SCHEDULE_OPTIONS:
        if saved.get(name) != getattr(options, name):
            raise InputError(f"--{name} {getattr(options, name)!r} differs from the checkpoint's "
                             f"{saved.get(name)!r} ({options.resume}): resume with the original settings")
    if payload["dataset"] != dataset.to_dict():
        raise InputError(f"{options.resume}: trained for dataset {payload['dataset'].get('name')!r}, "
                         f"not this definition of {dataset.name!r}")
    return payload


def check_resumed_tiles(payload: dict[str, Any] | None, tiles: list[str], list_path: str, resume: str | None) -> None:
    """The tiles of a resumed run must be those it was started with (same names, same order)."""
    saved = payload.get("tiles") if payload is not None else None
    if saved is not None and saved != tiles:
        raise InputError(f"{list_path}: the tiles differ from those of {resume}")


def check_resumed_config(payload: dict[str, Any] | None, config: Any, options: TrainOptions) -> None:
    """The model config of a resumed run must be the checkpoint's."""
    if payload is not None and config_to_dict(config) != payload["model_config"]:
        raise InputError(f"{options.resume}: its model config differs from --model_config "
                         f"{options.model_config} / --CNN_width {options.CNN_width}")
