"""The run folder (``--out_dir``): checkpoints, what they hold, and the checks that make resume exact.

Layout: ``last.pth`` after every epoch (what ``--resume`` reads: weights plus optimiser state),
``epoch_N.pth`` every ``--save_interval`` epochs and after the last (model-only snapshots, about half
the size: what ``test.py`` and ``auto_test.sh`` map with), ``run_config.json`` (every setting, the
model config, the dataset definition, package versions and the git commit, written at start),
``train.log``, ``tensorboard/`` and ``val/`` (the maps of the last validation). Every file is
written atomically. A run holds an exclusive lock on ``.train.lock`` while it writes (the kernel
drops it when the process dies), and ``--overwrite`` moves a previous run's files aside into
``previous_run_<time>/`` so the folder holds one run.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch

from dataset import DatasetDefinition
from dataset.definition import LATER_FIELDS, REPO_ROOT, without_prose
from dataset.errors import InputError
from dataset.files import FolderLock, atomic_output, check_output_folder, remove_stale_temporaries
from networks import read_checkpoint, save_checkpoint
from networks.config import config_to_dict
from training.options import SCHEDULE_OPTIONS, TrainOptions, value_before_option_existed

#: Entries a checkpoint must have to continue a run from it.
TRAINING_STATE = ("optimizer", "epoch", "step", "total_steps", "train_args")
#: Training entries an ``epoch_N.pth`` snapshot leaves out: the optimiser state doubles the file.
RESUME_ONLY = ("optimizer", "rng")
#: Distributions whose versions ``run_config.json`` records (the runtime part of requirements.txt).
RECORDED_PACKAGES = ("torch", "torchvision", "numpy", "rasterio", "tqdm", "tensorboardX", "ml-collections")
#: What a run writes in its folder (glob patterns): what ``--overwrite`` moves aside.
RUN_ENTRIES = ("last.pth", "epoch_*.pth", "run_config*.json", "train.log", "tensorboard", "val")
LOCK_NAME = ".train.lock"


class RunFolder:
    """Paths of one run and the writing of its checkpoints."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.last = os.path.join(path, "last.pth")
        self.val = os.path.join(path, "val")
        self.lock: FolderLock | None = None

    def epoch_checkpoint(self, epoch: int) -> str:
        return os.path.join(self.path, f"epoch_{epoch}.pth")

    def refuse_existing_run(self, options: TrainOptions) -> None:
        """A new run must not silently replace one that is saved here."""
        if os.path.exists(self.last) and not options.resume and not options.overwrite:
            raise InputError(f"{self.last}: a run is already saved here; continue it with --resume {self.last}, "
                             f"or pass --overwrite, or choose another --out_dir")

    def claim(self, options: TrainOptions) -> str | None:
        """Make the folder this run's (main rank): writable, locked against a second run, free of
        temporary files of a killed run, and with ``--overwrite`` cleared of a previous run.

        Returns:
            What was done with a previous run, for the log (None if nothing).

        Raises:
            InputError: the folder cannot be written, another run holds it, or it holds a run and
                neither ``--resume`` nor ``--overwrite`` is given.
        """
        check_output_folder(self.path, "--out_dir")
        os.makedirs(self.path, exist_ok=True)
        self.lock = FolderLock(self.path, LOCK_NAME, "another training run")
        self.refuse_existing_run(options)
        remove_stale_temporaries([self.last, self.run_config_path(0)]
                                 + [self.epoch_checkpoint(e) for e in range(options.max_epochs)])
        return self.set_aside_previous_run() if options.overwrite and not options.resume else None

    def set_aside_previous_run(self) -> str | None:
        """Move the files of :data:`RUN_ENTRIES` into ``previous_run_<time>/``; returns a log line or None."""
        found = sorted({p for pattern in RUN_ENTRIES for p in glob.glob(os.path.join(glob.escape(self.path), pattern))})
        if not found:
            return None
        target = os.path.join(self.path, "previous_run_" + time.strftime("%Y%m%d-%H%M%S"))
        suffix = 1
        while os.path.exists(target + (f"_{suffix}" if suffix > 1 else "")):
            suffix += 1
        target += f"_{suffix}" if suffix > 1 else ""
        os.makedirs(target)
        for path in found:
            os.replace(path, os.path.join(target, os.path.basename(path)))
        names = ", ".join(os.path.basename(p) for p in found)
        return f"--overwrite: moved the previous run ({names}) to {target}; delete it when it is no longer needed"

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def save(self, epoch: int, *, keep_epoch: bool, model: torch.nn.Module, model_config: Any,
             dataset: DatasetDefinition, state: dict[str, Any]) -> list[str]:
        """Write ``last.pth`` (everything, for resume) and, if ``keep_epoch``, ``epoch_{epoch}.pth``
        without the optimiser state (loads with ``load_model``). Returns the paths."""
        save_checkpoint(self.last, model=model, model_config=model_config, dataset=dataset, **state)
        if not keep_epoch:
            return [self.last]
        path = self.epoch_checkpoint(epoch)
        snapshot = {key: value for key, value in state.items() if key not in RESUME_ONLY}
        save_checkpoint(path, model=model, model_config=model_config, dataset=dataset, **snapshot)
        return [path, self.last]

    def run_config_path(self, start_epoch: int) -> str:
        """``run_config.json`` for a fresh run; a resumed one keeps it and writes its own beside it."""
        name = "run_config.json" if start_epoch == 0 else f"run_config_resumed_at_epoch_{start_epoch}.json"
        return os.path.join(self.path, name)

    def write_run_config(self, start_epoch: int, config: dict[str, Any]) -> str:
        """Write ``config`` (:func:`run_config`) as indented JSON; returns the path."""
        path = self.run_config_path(start_epoch)
        with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, default=str)
            fh.write("\n")
        return path


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


def git_state(folder: str = REPO_ROOT) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``folder``; None outside one or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    """Python, the recorded distributions (None when one is not installed), CUDA and cuDNN."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return versions


def run_config(*, options: TrainOptions, model_config: Any, dataset: DatasetDefinition, list_path: str,
               tiles: list[str], schedule: dict[str, Any], processes: int, device: torch.device) -> dict[str, Any]:
    """Everything that defines a run, as plain data: what ``run_config.json`` holds."""
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "options": dataclasses.asdict(options),
        "model_config": config_to_dict(model_config),
        "dataset": dataset.to_dict(),
        "list": os.path.abspath(list_path),
        "tiles": tiles,
        "schedule": schedule,
        "processes": processes,
        "device": str(device),
        "versions": package_versions(),
        "git": git_state(),
        "host": platform.node(),
    }


def extended_horizon(payload: dict[str, Any], max_epochs: int, steps_per_epoch: int) -> int:
    """Poly horizon of a resumed run: the checkpoint's, plus the steps of the epochs that a larger
    ``--max_epochs`` adds (the schedule is re-planned from the current step to the new horizon)."""
    added = max_epochs - int(payload["train_args"]["max_epochs"])
    return int(payload["total_steps"]) + max(added, 0) * steps_per_epoch


def read_resume(options: TrainOptions, dataset: DatasetDefinition) -> dict[str, Any] | None:
    """The ``--resume`` checkpoint, checked against this run's settings and dataset (None without it).

    Every :data:`SCHEDULE_OPTIONS` entry must match, except that a larger ``--max_epochs`` extends
    the run (see :func:`extended_horizon`).
    """
    if not options.resume:
        return None
    payload = read_checkpoint(options.resume)
    missing = [k for k in TRAINING_STATE if k not in payload]
    if missing:
        hint = ("it is a model-only epoch snapshot: resume from last.pth of its run" if "epoch" in payload
                else "to start from its weights use a fresh run")
        raise InputError(f"{options.resume}: not a training checkpoint (lacks {missing}); {hint}")
    saved = payload["train_args"]
    if options.max_epochs < saved["max_epochs"]:
        raise InputError(f"--max_epochs {options.max_epochs} is below the checkpoint's {saved['max_epochs']} "
                         f"({options.resume}): a run can be extended, not shortened")
    for name in SCHEDULE_OPTIONS:
        before = saved.get(name, value_before_option_existed(name))
        if name != "max_epochs" and before != getattr(options, name):
            raise InputError(f"--{name} {getattr(options, name)!r} differs from the checkpoint's "
                             f"{before!r} ({options.resume}): resume with the original settings")
    current = {k: v for k, v in dataset.to_dict().items() if k in payload["dataset"] or k not in LATER_FIELDS}
    if without_prose(payload["dataset"]) != without_prose(current):
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
