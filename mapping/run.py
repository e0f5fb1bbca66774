"""Mapping a whole tile list with one checkpoint (what test.py runs): device, dataset, shards, resume.

:func:`run_mapping` is ``test.py`` without its argument parsing.

Every output is written under a temporary name, read back, and renamed only when complete. Tiles
whose outputs exist, are complete and were made by the same checkpoint and window settings (the
:data:`mapping.writer.PROVENANCE_TAG` of each map) are skipped unless ``overwrite``, so re-running
an interrupted command resumes it; incomplete outputs are re-mapped, and outputs of another
checkpoint or other settings stop the run. Each output is locked while it is checked and written, so
a second run into the same folder neither deletes a map in progress nor maps it again
(:func:`map_list`). Under ``torchrun`` each rank maps every
``WORLD_SIZE``-th tile of the list, starting at its ``RANK``, on GPU ``LOCAL_RANK``; no process
group is needed because ranks share nothing. With ``--shard K/N`` (a scheduler's job array) the
process maps every N-th tile from the K-th, and torchrun ranks split that shard in turn
(:func:`tile_share`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dataset import TileEntry, load_dataset
from dataset.checks import imagery_scale_warning
from dataset.errors import InputError
from dataset.files import check_output_folder, locked_in_turn, remove_stale_temporaries
from dataset.raster_io import check_bands, open_raster
from mapping.nodata import AUTO
from mapping.options import MapOptions
from mapping.overviews import OVERVIEW_MIN_SIZE
from mapping.preview import write_preview
from mapping.writer import describe_provenance, map_provenance, map_tile, output_name, output_state, probs_name
from networks import model_from_checkpoint, read_checkpoint
from runtime.device import distributed_rank, prepare_device, resolve_device


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


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def tile_share(entries: Sequence[TileEntry], shard: tuple[int, int] = (0, 1), rank: int = 0, world: int = 1
               ) -> list[TileEntry]:
    """The tiles one process maps: shard ``K`` of ``N`` takes every N-th tile from the K-th, and rank
    ``r`` of ``world`` every world-th tile of that shard, so that all (shard, rank) pairs together
    map every tile exactly once (tile ``i`` goes to shard ``i % N``, rank ``(i // N) % world``)."""
    index, count = shard
    return list(entries[index::count][rank::world])


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
    out_dir: str
    save_probs: bool = False
    preview: bool = False
    overview_min_size: int = OVERVIEW_MIN_SIZE
    outputs: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.outputs = [os.path.join(self.out_dir, output_name(e.image)) for e in self.entries]
        seen: dict[str, str] = {}
        for entry, out in zip(self.entries, self.outputs):
            if out in seen:
                raise InputError(f"{entry.image}: same output name as {seen[out]} ({out})")
            seen[out] = entry.image

    def probs_path(self, out: str) -> str | None:
        return os.path.join(self.out_dir, probs_name(out)) if self.save_probs else None

    def preview_path(self, out: str) -> str | None:
        return os.path.splitext(out)[0] + "_preview.png" if self.preview else None


def needs_mapping(out: str, probs: str | None, provenance: str | None, log: Callable[[str], None]) -> bool:
    """Whether a tile must be (re-)mapped: an output is missing or incomplete (said in the log).

    Raises:
        InputError: an output was made by another checkpoint or with other settings.
    """
    needed = False
    for path in (out, probs) if probs else (out,):
        state, detail = output_state(path, provenance)
        if state == "other":
            raise InputError(f"{path}: made with {detail}, not by this run ({describe_provenance(provenance)}); "
                             "pass --overwrite to re-map, or choose another --out_dir")
        if state == "incomplete":
            log(f"re-mapping {out}: {path} is incomplete ({detail})")
        needed = needed or state != "current"
    return needed


def map_list(model, plan: MappingPlan, *, dataset, chip_size: int = 224, stride: int = 112, batch_size: int = 16,
             device: str | torch.device = "cpu", amp: bool = False, num_workers: int = 0, overwrite: bool = False,
             progress: Callable | None = None, log: Callable[[str], None] = print,
             provenance: str | None = None, guided_filter: int | None = None, image_nodata: str = AUTO
             ) -> dict[str, list[str]]:
    """Map every tile of ``plan`` (and write probabilities and previews if asked).

    Every existing output is checked before the first tile is mapped (:func:`needs_mapping`). Each
    tile is then handled under its output's lock (:func:`~dataset.files.locked_in_turn`): temporary
    files that an interrupted run left for it are removed and, if the first check found it missing
    or incomplete, it is checked again and mapped if still needed (a complete output is read once).
    A tile still to map that another process is mapping (a second run into the folder) is left
    until the other tiles are done, then waited for and checked again: skipped if that process
    completed it with the same checkpoint and settings, mapped if it did not, refused if it made
    it with others. ``guided_filter`` (None: the model's) and ``image_nodata`` are :func:`~mapping.writer.map_tile`'s.

    Returns:
        ``{"mapped": [...], "skipped": [...]}`` output paths; skipped tiles already had outputs.
    """
    done: dict[str, list[str]] = {"mapped": [], "skipped": []}

    # Every output checked once before any work, so that another run's outputs stop it here. Under its lock an
    # output is checked again only where work was found: another process may have done it meanwhile.
    pending = {out for out in plan.outputs
               if overwrite or needs_mapping(out, plan.probs_path(out), provenance, lambda _: None)}

    items = list(zip(plan.entries, plan.outputs))
    turns = locked_in_turn(plan.out_dir, progress(items) if progress else items, lambda item: item[1],
                           lambda out: log(f"waiting for {out}: another process is mapping it"))
    with contextlib.closing(turns):
        for entry, out in turns:
            probs = plan.probs_path(out)
            remove_stale_temporaries([path for path in (out, probs) if path])
            needed = overwrite or (out in pending and needs_mapping(out, probs, provenance, log))
            if not needed:
                done["skipped"].append(out)
            else:
                map_tile(model, entry.image, out, dataset=dataset, chip_size=chip_size, stride=stride,
                         batch_size=batch_size, device=device, amp=amp, overwrite=True, probs_path=probs,
                         num_workers=num_workers, overview_min_size=plan.overview_min_size, provenance=provenance,
                         guided_filter=guided_filter, image_nodata=image_nodata)
                done["mapped"].append(out)
                log(f"mapped {entry.image} -> {out}")
            png = plan.preview_path(out)
            if png and (needed or not os.path.isfile(png)):
                write_preview(png, entry.image, out, dataset, label_path=entry.label, hr_path=entry.hr_label)
    return done


def run_mapping(options: MapOptions, progress: Callable | None = None,
                log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Load the checkpoint, read and check the list (this shard's and rank's share), map it.

    Returns:
        :func:`map_list`'s ``{"mapped": [...], "skipped": [...]}``.
    """
    device = resolve_device(options.device, options.gpu)
    check_output_folder(options.out_dir, "--out_dir")
    prepare_device(device)
    digest = hashlib.sha256()  # of the very bytes loaded (the maps' provenance)
    model = model_from_checkpoint(read_checkpoint(options.checkpoint, digest=digest), device=device,
                                  where=options.checkpoint, label_model_weight=options.label_model_weight)
    dataset = select_dataset(model.dataset, options.dataset)
    guided = model.guided_filter if options.guided_filter is None else options.guided_filter
    if guided:
        log(f"guided filter of radius {guided} on each chip's probabilities"
            + (" (the checkpoint's recipe)" if options.guided_filter is None else ""))
    if model.label_model_weight:
        log(f"the run's label model votes with weight {model.label_model_weight:g}"
            + (" (the checkpoint's recipe)" if options.label_model_weight is None else ""))
    provenance = map_provenance(digest.hexdigest(), dataset.name, options.chip_size, options.stride, guided,
                                model.label_model_weight, options.image_nodata)
    _, entries = options.read_list(dataset, required=("image_fn",))
    rank, world, _ = distributed_rank()
    entries = tile_share(entries, options.shard_index, rank, world)
    check_tiles(entries, dataset)
    scale_warning = imagery_scale_warning([e.image for e in entries], dataset)
    if scale_warning:
        _stderr(scale_warning)
    plan = MappingPlan(entries, options.out_dir, save_probs=options.save_probs, preview=options.preview,
                       overview_min_size=options.overview_min_size)
    return map_list(model, plan, dataset=dataset, chip_size=options.chip_size, stride=options.stride,
                    batch_size=options.batch_size, device=device, amp=options.amp, num_workers=options.num_workers,
                    overwrite=options.overwrite, progress=progress, log=log, provenance=provenance,
                    guided_filter=guided, image_nodata=options.image_nodata)
