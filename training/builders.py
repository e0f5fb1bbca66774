"""Everything a training run builds before its first step: checked tile lists, model, optimiser, data.

Each builder does its checks up front, so bad input fails before the first step with one line
that names the file or option.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import networks
from dataset import DatasetDefinition, TileEntry
from dataset.checks import check_entries, imagery_scale_warning, label_histogram, raise_problems
from dataset.errors import InputError
from dataset.raster_io import open_raster
from networks import load_deit_weights, resolve_pretrained
from networks.config import get_config
from networks.label_model import BaggedLabelModel, NdviBand
from training.augment import random_jitter
from training.chips import (
    ChipBatch,
    ChipStream,
    StreamError,
    code_pixels,
    normalization_constants,
    normalize_on_device,
)
from training.distributed import DistributedContext
from training.logger import RunLogger
from training.losses import RecipeLoss
from training.options import TrainOptions
from training.refine import LabelRefiner, fit_local_model, seed_non_vegetated

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


def check_tiles(entries: list[TileEntry], dataset: DatasetDefinition, where: str, *, check_hr: bool,
                scan_codes: bool, ctx: DistributedContext, log: RunLogger) -> None:
    """Check every tile (shared out over ranks) and raise one InputError listing the problems."""
    def progress(rows):
        return tqdm(rows, desc=f"checking {where}", unit="tile", disable=not ctx.is_main, leave=False)

    problems = check_entries(ctx.my_share(entries), dataset, check_hr=check_hr, scan_codes=scan_codes,
                             progress=progress)
    problems = ctx.gather_lists(problems)
    for problem in problems[1:]:
        log.error(problem)
    raise_problems(problems, where)


def training_tiles(options: TrainOptions, dataset: DatasetDefinition, ctx: DistributedContext,
                   log: RunLogger) -> tuple[str, list[TileEntry]]:
    """``(list path, usable tiles)``: the checked list, without tiles smaller than a chip (reported)."""
    list_path, entries = options.read_list(dataset, required=("image_fn", "label_fn"))
    check_tiles(entries, dataset, list_path, check_hr=False, scan_codes=not options.skip_label_scan, ctx=ctx,
                log=log)
    usable = []
    for entry in entries:
        with open_raster(entry.image, "image") as src:
            if min(src.height, src.width) >= options.chip_size:
                usable.append(entry)
            elif ctx.is_main:  # every rank reads the whole list; one report is enough
                log.warning(f"{entry.image}: tile {src.width}x{src.height} is smaller than a "
                            f"{options.chip_size} chip; skipped")
    if not usable:
        raise InputError(f"{list_path}: no tile is at least {options.chip_size}x{options.chip_size} "
                         "pixels (lower --chip_size)")
    scale_warning = imagery_scale_warning([e.image for e in usable], dataset) if ctx.is_main else None
    if scale_warning:
        log.warning(scale_warning[len("warning: "):])
    return list_path, usable


def validation_tiles(options: TrainOptions, dataset: DatasetDefinition, ctx: DistributedContext,
                     log: RunLogger) -> list[TileEntry]:
    """The checked ``--val_list`` tiles with their HR references (empty without ``--val_list``)."""
    if not options.val_list:
        return []
    if dataset.hr_label is None:
        raise InputError(f"--val_list: dataset {dataset.name!r} has no HR reference table (hr_label)")
    _, entries = options.read_list(dataset, ("image_fn", "hr_label_fn"), path=options.val_list)
    check_tiles(entries, dataset, options.val_list, check_hr=True, scan_codes=not options.skip_label_scan, ctx=ctx,
                log=log)
    return entries


def model_config(options: TrainOptions, dataset: DatasetDefinition) -> Any:
    """``--model_config`` with ``--CNN_width``, the dataset's bands and classes, the chip and aux head."""
    config = get_config(options.model_config)
    if options.CNN_width is not None:
        groups = config.l2hnet.gn_groups
        if options.CNN_width % groups:
            raise InputError(f"--CNN_width {options.CNN_width}: must be a multiple of {groups} "
                             "(64 light, 128 normal)")
        config.l2hnet.width = options.CNN_width
    config.in_channels = dataset.num_bands
    config.num_classes = dataset.num_classes
    config.img_size = options.chip_size
    config.aux_head.enabled = options.aux_loss
    return config


def model(options: TrainOptions, config: Any, ctx: DistributedContext, log: RunLogger,
          resume_from: dict[str, Any] | None) -> torch.nn.Module:
    """Seeded initialisation, DeiT-tiny blocks if ``--pretrained``, the resumed weights, SyncBN and DDP."""
    torch.manual_seed(options.seed)
    built = networks.build_model(config)
    if options.pretrained and resume_from is None:
        path = resolve_pretrained(options.pretrained, progress=ctx.is_main)
        report = load_deit_weights(built, path)
        log.info(f"pretrained: {len(report['loaded'])} tensors from {path}, {len(report['skipped'])} unused")
    elif options.pretrained:
        log.warning("--pretrained ignored: the weights come from --resume")
    if resume_from is not None:
        networks.load_weights(built, resume_from["state_dict"], options.resume)
    return ctx.wrap(built.to(ctx.device))


def optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    """SGD over all parameters, one group (docs/design.md §6.5), or AdamW (``--optimizer adamw``); the lr is set
    before every step."""
    if options.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=options.base_lr, weight_decay=WEIGHT_DECAY)
    return torch.optim.SGD(model.parameters(), lr=options.base_lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def loss(options: TrainOptions, dataset: DatasetDefinition, entries: list[TileEntry], ctx: DistributedContext,
         log: RunLogger) -> RecipeLoss:
    """The recipe's loss; ``--label_loss mix`` needs the dataset's ``lr_mixes``; ``--class_balance`` reads
    the LR label histograms of ``entries`` (each code counted as its mix under ``--label_loss mix`` or
    ``--refine_labels local``), each rank its share of them."""
    device = ctx.device
    mixes = options.label_loss == "mix"
    if mixes and not dataset.lr_mixes:
        raise InputError(f"--label_loss mix: dataset {dataset.name!r} gives no lr_mixes (the class mix of each "
                         "LR code; see docs/training.md)")
    mix_table = torch.from_numpy(dataset.mix_table(with_mixes=True)).to(device) if mixes else None
    weights = None
    if options.class_balance:
        # Refined labels hold the classes of each code's mix (the roads of a developed block), not only
        # its majority class: their shares come from the mixes, so that no class the labels may hold weighs 0.
        shares_table = dataset.mix_table(with_mixes=mixes or options.refine_labels == "local")
        weights = class_weights(entries, dataset, shares_table, options.class_balance, ctx)
        weights = torch.from_numpy(weights).to(device)
        log.info(f"class weights (--class_balance {options.class_balance:g}): "
                 + ", ".join(f"{n} {w:.2f}" for n, w in zip(dataset.class_names[1:], weights.tolist()[1:])))
    return RecipeLoss(options.label_loss, mix_table=mix_table, mix_cell=options.mix_cell,
                      entropy_weight=options.entropy_weight, class_weights=weights, gce_q=options.gce_q,
                      focal_gamma=options.focal_gamma)


def class_weights(entries: list[TileEntry], dataset: DatasetDefinition, table: np.ndarray, power: float,
                  ctx: DistributedContext | None = None) -> np.ndarray:
    """``(classes,)`` float32 weights ``share ** -power`` from the LR label histograms of ``entries``
    (each code counted as its ``table`` row), scaled so the average training pixel weighs 1; classes
    that never occur weigh 0. With ``ctx`` each rank reads its share of the labels and the pixel
    counts are summed over the ranks (integers: every rank gets the same weights, bit for bit)."""
    counts = np.zeros(table.shape[0], dtype=np.int64)
    for entry in ctx.my_share(entries) if ctx else entries:
        with open_raster(entry.label, "label") as src:
            codes, n = label_histogram(src)
        inside = codes < table.shape[0]
        np.add.at(counts, codes[inside].astype(np.int64), n[inside])
    if ctx:
        counts = np.sum(ctx.gather_lists([counts]), axis=0)
    share = counts.astype(np.float64) @ table.astype(np.float64)
    share = share / max(share.sum(), 1.0)
    weights = np.where(share > 0, np.power(np.maximum(share, 1e-12), -power), 0.0)
    weights /= max(float((share * weights).sum()), 1e-12)
    return weights.astype(np.float32)


def chip_loader(entries: list[TileEntry], dataset: DatasetDefinition, options: TrainOptions,
                ctx: DistributedContext, log: RunLogger) -> tuple[ChipStream, torch.utils.data.DataLoader]:
    """The chip stream of this rank and its loader (batches are made by the stream)."""
    stream = ChipStream(entries, dataset, chip_size=options.chip_size, chips_per_tile=options.chips_per_tile,
                        batch_size=options.batch_size, seed=options.seed, rank=ctx.rank, world_size=ctx.world_size,
                        retries=options.chip_retries, with_codes=needs_codes(options),
                        focus_points=focus_points(entries, dataset, options, ctx, log),
                        focus_share=options.focus_chips)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=options.num_workers,
                                         pin_memory=ctx.device.type == "cuda")
    return stream, loader


#: At most this many pixels per tile are kept to centre ``--focus_chips`` chips on.
FOCUS_POINTS_PER_TILE = 4096


def focus_codes(dataset: DatasetDefinition) -> list[int]:
    """The raw LR codes whose class mix holds some of the dataset's non-vegetated class (``--focus_chips``)."""
    if not dataset.lr_mixes:
        raise InputError(f"--focus_chips: dataset {dataset.name!r} gives no lr_mixes (the class mix of each LR code, "
                         "which says which codes hold the non-vegetated class; see docs/training.md); --focus_chips 0 "
                         "turns it off")
    _, shares = non_vegetated_shares(dataset, "--focus_chips")
    return np.nonzero(shares > 0)[0].tolist()


def non_vegetated_shares(dataset: DatasetDefinition, flag: str) -> tuple[int, np.ndarray]:
    """``(index of the dataset's non_vegetated_class, (codes,) expected share of it in each raw LR code)`` for
    option ``flag``, which needs that class (an InputError naming ``flag`` when the definition has none)."""
    if dataset.non_vegetated_class is None:
        raise InputError(f"{flag}: dataset {dataset.name!r} names no non_vegetated_class (the class of roads, roofs "
                         f"and bare ground; see docs/training.md); {flag} 0 turns it off")
    target = dataset.class_names.index(dataset.non_vegetated_class)
    return target, dataset.mix_table(with_mixes=True)[:, target]


def focus_points(entries: list[TileEntry], dataset: DatasetDefinition, options: TrainOptions,
                 ctx: DistributedContext, log: RunLogger) -> list[np.ndarray] | None:
    """``--focus_chips``: per tile, up to ``FOCUS_POINTS_PER_TILE`` pixels of the :func:`focus_codes`, drawn
    from the run's seed (the same in every rank); None when off."""
    if not options.focus_chips:
        return None
    codes = focus_codes(dataset)
    rng = np.random.default_rng([options.seed, len(entries)])  # a stream apart from the refiner's default_rng(seed)
    rows = tqdm(entries, desc="finding focus pixels", unit="tile", disable=not ctx.is_main, leave=False)
    points = [code_pixels(entry.label, codes, FOCUS_POINTS_PER_TILE, rng) for entry in rows]
    log.info(f"focus chips (--focus_chips {options.focus_chips:g}): {sum(len(p) > 0 for p in points)} of "
             f"{len(entries)} tiles hold LR codes {codes}; that share of their chips is centred on them")
    return points


def needs_codes(options: TrainOptions) -> bool:
    """Whether training batches must carry the raw LR codes (the mix loss and label refinement use them)."""
    return options.label_loss == "mix" or options.refine_labels == "local"


#: Label refinement is fitted on chips from at most this many tiles, this many chips each.
REFINE_TILES = 256
REFINE_CHIPS_PER_TILE = 8
#: Local models averaged, each fitted on its own chips.
REFINE_BAGS = 5


def label_refiner(options: TrainOptions, dataset: DatasetDefinition, entries: list[TileEntry], device: torch.device,
                  log: RunLogger, resume_from: dict[str, Any] | None = None) -> LabelRefiner | None:
    """``--refine_labels local``: the bagged local-appearance label model, fitted on chips of the training
    tiles (or the resumed checkpoint's own), or None."""
    if options.refine_labels != "local":
        return None
    if not dataset.lr_mixes:
        off = "--refine_labels none" + (" --label_model_weight 0" if options.label_model_weight else "")
        raise InputError(f"--refine_labels local: dataset {dataset.name!r} gives no lr_mixes (the classes each LR "
                         f"code may hold; see docs/training.md); --recipe robust turns it on, {off} turns it off")
    seeding = seeding_plan(options, dataset)
    allowed = dataset.mix_table(with_mixes=True) > 0
    ndvi = None
    if options.refine_features == "ndvi":
        red, nir = red_and_nir(dataset, options)
        ndvi = NdviBand(red, nir, dataset.mean, dataset.std)
    if resume_from is not None and "label_model" in resume_from:
        model = BaggedLabelModel.empty(dataset.num_bands, dataset.num_classes, REFINE_BAGS, ndvi)
        model.load_state_dict(resume_from["label_model"])
        return LabelRefiner(model, allowed, device)
    rng = np.random.default_rng(options.seed)
    picked = [entries[i] for i in sorted(rng.choice(len(entries), size=min(len(entries), REFINE_TILES),
                                                    replace=False).tolist())]
    members, agreement, pixels = [], 0.0, 0.0
    for bag in range(REFINE_BAGS):
        # Each member's own chips (seeds apart from the epochs' chip draws).
        chips = refine_chips(picked, dataset, options, seed=options.seed + 1 + 1000 * bag, seeding=seeding)
        try:
            member, stats = fit_local_model(chips, dataset.num_classes, options.refine_balance, options.seed + bag,
                                            chip_count=len(picked) * REFINE_CHIPS_PER_TILE, ndvi=ndvi)
        except ValueError:
            raise InputError("--refine_labels local: no labelled pixel in the training chips to fit the label "
                             "model on") from None
        members.append(member)
        agreement, pixels = agreement + stats["agreement"] / REFINE_BAGS, pixels + stats["pixels"]
    details = (f" (NDVI-seeded {dataset.non_vegetated_class}: --refine_seeds {options.refine_seeds:g})"
               if seeding is not None else "")
    if options.refine_jitter:
        details += f", on chips with photometric jitter {options.refine_jitter:g},"
    if ndvi is not None:
        details += " with NDVI as one more band,"
    log.info(f"label refinement: {REFINE_BAGS} local models fitted to the {options.refine_targets} LR targets{details} of "
             f"{pixels:.0f} pixels of {len(picked)} tiles; their class is their target class on "
             f"{100 * agreement:.1f}% of them")
    return LabelRefiner(BaggedLabelModel(members), allowed, device)


def seeding_plan(options: TrainOptions, dataset: DatasetDefinition) -> dict[str, Any] | None:
    """``--refine_seeds``: the arguments of :func:`training.refine.seed_non_vegetated` (None when off)."""
    if not options.refine_seeds:
        return None
    if options.refine_targets != "hard":
        raise InputError(f"--refine_seeds seeds hard LR targets, not --refine_targets {options.refine_targets}; "
                         "--refine_seeds 0 turns it off")
    target, shares = non_vegetated_shares(dataset, "--refine_seeds")
    red, nir = red_and_nir(dataset, options)
    return {"shares": torch.from_numpy(shares * options.refine_seeds), "red": red, "nir": nir, "target": target}


def red_and_nir(dataset: DatasetDefinition, options: TrainOptions) -> tuple[int, int]:
    """The indices of the dataset's red and nir bands, which NDVI needs. When one is missing, an InputError
    names every option that computes NDVI and how to turn them all off (``--recipe robust`` sets both, and a
    3-band dataset should not have to find that out one error at a time)."""
    missing = [band for band in ("red", "nir") if band not in dataset.bands]
    if missing:
        users = {"--refine_seeds": ("--refine_seeds 0", bool(options.refine_seeds)),
                 "--refine_features ndvi": ("--refine_features bands", options.refine_features == "ndvi")}
        on = {flag: off for flag, (off, used) in users.items() if used}
        raise InputError(f"{' and '.join(on)}: dataset {dataset.name!r} has no {' and no '.join(missing)} band (its "
                         f"bands: {list(dataset.bands)}), and NDVI needs both; {' '.join(on.values())} turns "
                         f"{'them' if len(on) > 1 else 'it'} off")
    return dataset.bands.index("red"), dataset.bands.index("nir")


def refine_chips(entries: list[TileEntry], dataset: DatasetDefinition, options: TrainOptions, seed: int,
                 seeding: dict[str, Any] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(normalised image, target)`` batches of ``REFINE_CHIPS_PER_TILE`` chips per tile, drawn with ``seed``,
    one batch at a time, with ``--refine_jitter``'s photometric jitter drawn from ``seed``; targets are LR classes
    (NDVI-seeded with ``seeding``, see :func:`seeding_plan`), or class mixes with ``--refine_targets mix``."""
    mixes = options.refine_targets == "mix"
    stream = ChipStream(entries, dataset, chip_size=options.chip_size, chips_per_tile=REFINE_CHIPS_PER_TILE,
                        batch_size=options.batch_size, seed=seed, retries=options.chip_retries,
                        with_codes=mixes or seeding is not None)
    stream.set_epoch(0)
    scale, shift = normalization_constants(dataset.mean, dataset.std, torch.device("cpu"))
    mix_table = torch.from_numpy(dataset.mix_table(with_mixes=True))
    jitter = torch.Generator().manual_seed(seed)  # --refine_jitter's draws, apart from the chips'
    for item in stream:
        if isinstance(item, StreamError):
            raise InputError(item.message)
        if isinstance(item, ChipBatch):
            if mixes:
                target = mix_table[item.codes.long()]
            elif seeding is not None:
                target = seed_non_vegetated(item.image, item.codes, item.label.long(), **seeding)
            else:
                target = item.label.long()
            yield random_jitter(normalize_on_device(item.image, scale, shift), options.refine_jitter, jitter), target


def tile_names(entries: list[TileEntry]) -> list[str]:
    """What a checkpoint records of its tiles (a resumed run must have the same)."""
    return [os.path.basename(e.image) for e in entries]
