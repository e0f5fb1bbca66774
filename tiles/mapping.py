"""Mapping a whole tile list with one checkpoint (what test.py runs): device, dataset, shards, resume.

Every output is written under a temporary name and renamed when complete, and tiles whose
outputs exist are skipped (unless ``overwrite``), so re-running an interrupted command resumes
it. Under ``torchrun`` each rank maps every ``WORLD_SIZE``-th tile of the list, starting at its
``RANK``, on GPU ``LOCAL_RANK``; no process group is needed because ranks share nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dataset import TileEntry, load_dataset
from tiles.errors import InputError
from tiles.inference import map_tile, output_name, outputs_exist, probs_name
from tiles.preview import write_preview
from tiles.raster_io import check_bands, open_raster


def distributed_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (0, 1, 0 without it)."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def resolve_device(device: str = "auto", gpu: int = 0) -> torch.device:
    """The torch device to map on.

    Args:
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or another torch device.
        gpu: CUDA device index; under torchrun with several ranks ``LOCAL_RANK`` is used instead.

    Raises:
        InputError: CUDA requested but not available, or the index does not exist.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        try:
            return torch.device(device)
        except RuntimeError as exc:
            raise InputError(f"--device {device}: {exc}") from None
    if not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    _, world, local_rank = distributed_rank()
    index = local_rank if world > 1 else gpu
    if not 0 <= index < torch.cuda.device_count():
        raise InputError(f"--gpu {index}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def select_dataset(model_dataset, name: str | None, warn: Callable[[str], None] | None = None):
    """The dataset definition to map with: the checkpoint's own unless ``name`` names another.

    Another definition must have the checkpoint's band and class counts; it then supplies the
    normalisation, class names and colours, with a warning.

    Raises:
        InputError: unknown dataset, or band / class counts that differ from the checkpoint's.
    """
    if name is None:
        return model_dataset
    other = load_dataset(name)
    if other.name == model_dataset.name:
        return model_dataset
    if other.num_bands != model_dataset.num_bands:
        raise InputError(f"dataset {other.name!r} has {other.num_bands} bands, the checkpoint's model "
                         f"({model_dataset.name!r}) expects {model_dataset.num_bands}")
    if other.num_classes != model_dataset.num_classes:
        raise InputError(f"dataset {other.name!r} has {other.num_classes} classes, the checkpoint's model "
                         f"({model_dataset.name!r}) outputs {model_dataset.num_classes}")
    (warn or _stderr)(f"warning: the checkpoint was trained for dataset {model_dataset.name!r}; mapping with "
                      f"{other.name!r} (its normalisation, class names and colours)")
    return other


def list_root_for(list_path: str, dataset, root: str | None = None) -> str:
    """How relative paths of ``list_path`` resolve: ``root`` if given; the dataset's ``list_root``
    for lists in the folder of its default list (the published ``dataset/CSV_list``); else "csv"."""
    if root:
        return root
    default = dataset.default_list()
    if default and os.path.dirname(os.path.abspath(default)) == os.path.dirname(os.path.abspath(list_path)):
        return dataset.list_root
    return "csv"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def check_tiles(entries: Sequence[TileEntry], dataset) -> None:
    """Open every tile before mapping any, so a bad tile stops the run before it starts.

    Raises:
        InputError: naming the tile that is missing, unreadable or has the wrong band count.
    """
    for entry in entries:
        with open_raster(entry.image, "image") as src:
            check_bands(src, dataset.num_bands)


@dataclass
class MappingPlan:
    """Where each tile of a list goes."""

    entries: list[TileEntry]
    save_path: str
    save_probs: bool = False
    preview: bool = False
    outputs: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.outputs = [os.path.join(self.save_path, output_name(e.image)) for e in self.entries]
        seen: dict[str, str] = {}
        for entry, out in zip(self.entries, self.outputs):
            if out in seen:
                raise InputError(f"{entry.image}: same output name as {seen[out]} ({out})")
            seen[out] = entry.image

    def probs_path(self, out: str) -> str | None:
        return os.path.join(self.save_path, probs_name(out)) if self.save_probs else None

    def preview_path(self, out: str) -> str | None:
        return os.path.splitext(out)[0] + "_preview.png" if self.preview else None


def map_list(model, plan: MappingPlan, *, dataset, chip_size: int = 224, stride: int = 112, batch_size: int = 16,
             device: str | torch.device = "cpu", amp: bool = False, num_workers: int = 0, overwrite: bool = False,
             progress: Callable | None = None, log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Map every tile of ``plan`` (and write probabilities and previews if asked).

    Returns:
        ``{"mapped": [...], "skipped": [...]}`` output paths; skipped tiles already had outputs.
    """
    done: dict[str, list[str]] = {"mapped": [], "skipped": []}
    items = list(zip(plan.entries, plan.outputs))
    for entry, out in (progress(items) if progress else items):
        probs = plan.probs_path(out)
        if not overwrite and outputs_exist(out, probs):
            done["skipped"].append(out)
        else:
            map_tile(model, entry.image, out, dataset=dataset, chip_size=chip_size, stride=stride,
                     batch_size=batch_size, device=device, amp=amp, overwrite=True, probs_path=probs,
                     num_workers=num_workers)
            done["mapped"].append(out)
            log(f"mapped {entry.image} -> {out}")
        png = plan.preview_path(out)
        if png and (overwrite or not os.path.isfile(png)):
            write_preview(png, entry.image, out, dataset, label_path=entry.label, hr_path=entry.hr_label)
    return done
