"""Training VCNet from GeoTIFF tiles and low-resolution labels (spec section 6, defects 6-13 fixed).

:class:`Trainer` does everything ``train.py`` asks for: it reads and checks the tile list up
front, builds the model, the SGD optimiser and the chip stream, runs the epochs (optionally under
``torchrun`` with DistributedDataParallel), writes checkpoints, logs and TensorBoard scalars, and
resumes a run exactly at an epoch boundary.

Reproducibility: model initialisation uses ``torch.manual_seed(seed)``. Tile order and chip
positions come from explicit generators of ``(seed, epoch, tile)`` (:mod:`tiles.sampling`). The
global torch RNG, which dropout draws from, is reseeded at the start of every epoch from
``(seed, epoch, rank)``. So a run resumed from ``last.pth`` continues with exactly the chips, the
dropout masks and the learning rates of the uninterrupted run, and different ranks draw
different dropout masks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import networks
from dataset import TileEntry, load_dataset, read_list
from losses import LossTerms, vcnet_loss
from networks import load_deit_weights, read_checkpoint, save_checkpoint
from networks.config import CONFIG_NAMES, config_to_dict, get_config
from tiles.chips import ChipStream, normalization_constants, normalize_on_device
from tiles.errors import InputError
from tiles.evaluation import format_metric
from tiles.inference import map_tile, output_name
from tiles.mapping import distributed_rank, list_root_for, resolve_device
from tiles.metrics import compute_metrics, confusion_for_pair
from tiles.raster_io import atomic_output, open_raster
from tiles.sampling import make_rng, poly_lr, published_lr, steps_per_epoch
from tiles.validate import check_entries, raise_problems

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
LOSS_TERMS = ("loss", "loss_cnn", "loss_vit", "loss_aux")
# Options that define the data, the model and the schedule: a resumed run must use the same.
# (The model config is compared as a whole.)
SCHEDULE_OPTIONS = ("max_epochs", "batch_size", "base_lr", "seed", "chip_size", "chips_per_tile", "chip_retries")
_DROPOUT_STREAM = 2


@dataclasses.dataclass
class TrainOptions:
    """Every setting of a training run; ``train.py --help`` documents each one."""

    dataset: str = "Chesapeake"
    list_dir: str | None = None
    list_root: str | None = None
    savepath: str = "runs/vcnet"
    max_epochs: int = 100
    batch_size: int = 2
    base_lr: float = 0.01
    seed: int = 1234
    CNN_width: int | None = None
    model_config: str = "vcnet"
    chip_size: int = 224
    chips_per_tile: int = 50
    chip_retries: int = 0
    num_workers: int = dataclasses.field(default_factory=lambda: min(8, os.cpu_count() or 1))
    device: str = "auto"
    gpu: int = 0
    amp: bool = False
    pretrained: str | None = None
    resume: str | None = None
    overwrite: bool = False
    save_interval: int = 20
    val_list: str | None = None
    val_interval: int = 10
    aux_loss: bool = False
    log_interval: int = 10
    deterministic: bool = False
    skip_label_scan: bool = False

    def check(self) -> None:
        """Raise InputError naming the first option with an unusable value."""
        positive = ("max_epochs", "chips_per_tile", "save_interval", "val_interval", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.batch_size < 2:
            raise InputError(f"--batch_size {self.batch_size}: must be at least 2 (BatchNorm needs two samples)")
        if self.chip_size < 32 or self.chip_size % 32:
            raise InputError(f"--chip_size {self.chip_size}: must be a positive multiple of 32")
        if not self.base_lr > 0 or not math.isfinite(self.base_lr):
            raise InputError(f"--base_lr {self.base_lr}: must be a positive number")
        if self.num_workers < 0 or self.chip_retries < 0:
            raise InputError("--num_workers and --chip_retries must not be negative")
        if self.model_config not in CONFIG_NAMES:
            raise InputError(f"--model_config {self.model_config!r}: choose one of {list(CONFIG_NAMES)}")
        if self.CNN_width is not None and self.CNN_width < 1:
            raise InputError(f"--CNN_width {self.CNN_width}: must be positive")


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the global torch RNG (dropout) for one epoch on one rank."""
    return int(make_rng(seed, _DROPOUT_STREAM, epoch, rank).integers(2**62))


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


class Trainer:
    """One training run. ``Trainer(options).fit()`` trains and returns a summary.

    Construction does every check that can be done up front (options, dataset, list, every tile,
    the resume checkpoint), so bad input fails before the first step. Under ``torchrun`` the
    process group is created here (NCCL on CUDA, gloo on CPU) and destroyed by :meth:`close`.
    """

    def __init__(self, options: TrainOptions) -> None:
        self.opts = options
        options.check()
        self.rank, self.world_size, local_rank = distributed_rank()
        self.is_main = self.rank == 0
        self.device = resolve_device(options.device, local_rank if self.world_size > 1 else options.gpu)
        self._owns_group = False
        self.log = logging.getLogger("vcnet.train")
        self.writer = None
        try:
            self._setup_runtime()
            self.dataset = load_dataset(options.dataset)
            self.resume_from = self._read_resume()
            self.entries = self._read_tiles()
            self.val_entries = self._read_val_list()
            self.model_config = self.build_config()
            self.model = self.build_model()
            self.optimizer = self.build_optimizer()
            self.stream, self.loader = self.build_data()
            self.base_lr = published_lr(options.base_lr, options.batch_size)
            self.steps_per_epoch = steps_per_epoch(len(self.entries), options.chips_per_tile, options.batch_size,
                                                   self.world_size, options.num_workers)
            if self.steps_per_epoch == 0:
                raise InputError(f"{len(self.entries)} tiles x {options.chips_per_tile} chips cannot fill a batch of "
                                 f"{options.batch_size} in every loader worker and process: raise --chips_per_tile "
                                 "or lower --batch_size / --num_workers")
            self.total_steps = options.max_epochs * self.steps_per_epoch
            self.start_epoch, self.step = 0, 0
            if self.resume_from is not None:
                self._restore(self.resume_from)
            self.scale, self.shift = normalization_constants(self.dataset.mean, self.dataset.std, self.device)
            self._reported: set[int] = set()
            self._announce()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup
    def _setup_runtime(self) -> None:
        opts = self.opts
        if opts.amp and self.device.type != "cuda":
            print("warning: --amp needs CUDA; training in float32 on the CPU", file=sys.stderr)
        self.amp = opts.amp and self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = not opts.deterministic
        if opts.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=60))
            self._owns_group = True
        existing = os.path.join(opts.savepath, "last.pth")
        if os.path.exists(existing) and not opts.resume and not opts.overwrite:
            raise InputError(f"{existing}: a run is already saved here; continue it with --resume {existing}, "
                             f"or pass --overwrite, or choose another --savepath")
        self._setup_logging()

    def _setup_logging(self) -> None:
        for handler in list(self.log.handlers):
            self.log.removeHandler(handler)
            handler.close()
        self.log.propagate = False
        self.log.setLevel(logging.INFO if self.is_main else logging.WARNING)
        console = _TqdmHandler()
        prefix = "" if self.world_size == 1 else f"[rank {self.rank}] "
        console.setFormatter(logging.Formatter(prefix + "%(message)s"))
        self.log.addHandler(console)
        if self.is_main:
            os.makedirs(self.opts.savepath, exist_ok=True)
            logfile = logging.FileHandler(os.path.join(self.opts.savepath, "train.log"))
            logfile.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(logfile)
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.opts.savepath, "tensorboard"))

    def _read_resume(self) -> dict[str, Any] | None:
        if not self.opts.resume:
            return None
        payload = read_checkpoint(self.opts.resume)
        missing = [k for k in ("optimizer", "epoch", "step", "total_steps", "train_args") if k not in payload]
        if missing:
            raise InputError(f"{self.opts.resume}: not a training checkpoint (lacks {missing}); "
                             "to start from its weights use a fresh run")
        saved = payload["train_args"]
        for name in SCHEDULE_OPTIONS:
            if saved.get(name) != getattr(self.opts, name):
                raise InputError(f"--{name} {getattr(self.opts, name)!r} differs from the checkpoint's "
                                 f"{saved.get(name)!r} ({self.opts.resume}): resume with the original settings")
        if payload["dataset"] != self.dataset.to_dict():
            raise InputError(f"{self.opts.resume}: trained for dataset {payload['dataset'].get('name')!r}, "
                             f"not this definition of {self.dataset.name!r}")
        return payload

    def _list_entries(self, path: str | None, required: tuple[str, ...]) -> list[TileEntry]:
        return read_list(path, required=required, root=list_root_for(path, self.dataset, self.opts.list_root))

    def _check_tiles(self, entries: list[TileEntry], where: str, check_hr: bool) -> None:
        """Check every tile (shared out over ranks) and raise one InputError listing the problems."""
        def progress(rows):
            return tqdm(rows, desc=f"checking {where}", unit="tile", disable=not self.is_main, leave=False)

        problems = check_entries(entries[self.rank::self.world_size], self.dataset, check_hr=check_hr,
                                 scan_codes=not self.opts.skip_label_scan, progress=progress)
        if self.world_size > 1:
            gathered: list[list[str]] = [[] for _ in range(self.world_size)]
            dist.all_gather_object(gathered, problems)
            problems = [p for part in gathered for p in part]
        for problem in problems[1:]:
            self.log.error(problem)
        raise_problems(problems, where)

    def _read_tiles(self) -> list[TileEntry]:
        list_path = self.opts.list_dir or self.dataset.default_list()
        if not list_path:
            raise InputError(f"dataset {self.dataset.name!r} has no default list: give --list_dir")
        self.list_path = list_path
        entries = self._list_entries(list_path, ("image_fn", "label_fn"))
        self._check_tiles(entries, list_path, check_hr=False)
        usable = []
        for entry in entries:
            with open_raster(entry.image, "image") as src:
                if min(src.height, src.width) >= self.opts.chip_size:
                    usable.append(entry)
                elif self.is_main:  # every rank reads the whole list; one report is enough
                    self.log.warning(f"{entry.image}: tile {src.width}x{src.height} is smaller than a "
                                     f"{self.opts.chip_size} chip; skipped")
        if not usable:
            raise InputError(f"{list_path}: no tile is at least {self.opts.chip_size}x{self.opts.chip_size} "
                             "pixels (lower --chip_size)")
        if self.resume_from is not None:
            saved = self.resume_from.get("tiles")
            if saved is not None and saved != [os.path.basename(e.image) for e in usable]:
                raise InputError(f"{list_path}: the tiles differ from those of {self.opts.resume}")
        return usable

    def _read_val_list(self) -> list[TileEntry]:
        if not self.opts.val_list:
            return []
        if self.dataset.hr_label is None:
            raise InputError(f"--val_list: dataset {self.dataset.name!r} has no HR reference table (hr_label)")
        entries = self._list_entries(self.opts.val_list, ("image_fn", "hr_label_fn"))
        self._check_tiles(entries, self.opts.val_list, check_hr=True)
        return entries

    # ------------------------------------------------------------------ builders
    def build_config(self):
        """The model config: ``--model_config`` with ``--CNN_width``, bands, classes, chip and aux head."""
        config = get_config(self.opts.model_config)
        if self.opts.CNN_width is not None:
            groups = config.l2hnet.gn_groups
            if self.opts.CNN_width % groups:
                raise InputError(f"--CNN_width {self.opts.CNN_width}: must be a multiple of {groups} "
                                 "(64 light, 128 normal)")
            config.l2hnet.width = self.opts.CNN_width
        config.in_channels = self.dataset.num_bands
        config.num_classes = self.dataset.num_classes
        config.img_size = self.opts.chip_size
        config.aux_head.enabled = self.opts.aux_loss
        if self.resume_from is not None and config_to_dict(config) != self.resume_from["model_config"]:
            raise InputError(f"{self.opts.resume}: its model config differs from --model_config "
                             f"{self.opts.model_config} / --CNN_width {self.opts.CNN_width}")
        return config

    def build_model(self) -> torch.nn.Module:
        """Seeded initialisation, DeiT-tiny blocks if ``--pretrained``, SyncBN and DDP if distributed."""
        torch.manual_seed(self.opts.seed)
        model = networks.build_model(self.model_config)
        if self.opts.pretrained and self.resume_from is None:
            report = load_deit_weights(model, self.opts.pretrained)
            self.log.info(f"pretrained: {len(report['loaded'])} tensors from {self.opts.pretrained}, "
                          f"{len(report['skipped'])} unused")
        elif self.opts.pretrained:
            self.log.warning("--pretrained ignored: the weights come from --resume")
        if self.resume_from is not None:
            model.load_state_dict(self.resume_from["state_dict"])
        model.to(self.device)
        if self.world_size > 1:
            # SyncBatchNorm needs CUDA; on CPU (gloo) BN statistics stay per rank and rank 0's
            # buffers are broadcast at every forward and at the end of every epoch.
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def build_optimizer(self) -> torch.optim.Optimizer:
        """SGD over all parameters, one group (spec 6.5); the lr is set before every step."""
        return torch.optim.SGD(self.model.parameters(), lr=self.opts.base_lr, momentum=MOMENTUM,
                               weight_decay=WEIGHT_DECAY)

    def build_data(self) -> tuple[ChipStream, torch.utils.data.DataLoader]:
        """The chip stream of this rank and its loader (batches are made by the stream)."""
        opts = self.opts
        stream = ChipStream(self.entries, self.dataset, chip_size=opts.chip_size, chips_per_tile=opts.chips_per_tile,
                            batch_size=opts.batch_size, seed=opts.seed, rank=self.rank, world_size=self.world_size,
                            retries=opts.chip_retries)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=opts.num_workers,
                                             pin_memory=self.device.type == "cuda")
        return stream, loader

    def _restore(self, payload: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(payload["optimizer"])
        self.start_epoch = int(payload["epoch"]) + 1
        self.step = int(payload["step"])
        self.total_steps = int(payload["total_steps"])
        if int(payload.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
            self.log.warning("the number of processes or loader workers differs from the checkpoint's: the run "
                             "continues the same schedule but its batches are not those of the original run")

    def _announce(self) -> None:
        opts = self.opts
        params = sum(p.numel() for p in self.model.parameters())
        scaled = f" (published scaling of {opts.base_lr} for batch {opts.batch_size})" \
            if self.base_lr != opts.base_lr else ""
        self.log.info(f"dataset {self.dataset.name}: {len(self.entries)} tiles from {self.list_path}")
        self.log.info(f"model {opts.model_config} (CNN width {self.model_config.l2hnet.width}), {params:,} parameters, "
                      f"device {self.device}, {self.world_size} process(es), amp {self.amp}")
        self.log.info(f"{opts.max_epochs} epochs x {self.steps_per_epoch} steps at most = poly horizon "
                      f"{self.total_steps} steps, base lr {self.base_lr:g}{scaled}")
        if self.resume_from is not None:
            done = " (all epochs are done)" if self.start_epoch >= opts.max_epochs else ""
            self.log.info(f"resumed from {opts.resume}: epoch {self.start_epoch + 1}, step {self.step}{done}")

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs. Returns the last epoch's statistics and checkpoint paths."""
        summary: dict[str, Any] = {"epochs": [], "checkpoints": []}
        try:
            for epoch in range(self.start_epoch, self.opts.max_epochs):
                stats = self.train_epoch(epoch)
                if self.val_entries and ((epoch + 1) % self.opts.val_interval == 0
                                         or epoch == self.opts.max_epochs - 1):
                    stats.update(self.validate(epoch))
                summary["epochs"].append(stats)
                summary["checkpoints"].extend(self.save(epoch, stats))
            summary["step"] = self.step
            return summary
        finally:
            self.close()

    def _batches(self) -> Iterator[dict | None]:
        """Batches of this rank; yields None when the rank is out of data. Notices are logged
        once per tile; an error item becomes an InputError."""
        for item in self.loader:
            if "image" in item:
                self.counters["skipped"] += item["skipped"]
                yield item
            elif "error" in item:
                self.error = item["error"]
                break
            elif "notice" in item:
                if item["tile"] not in self._reported:
                    self._reported.add(item["tile"])
                    self.log.warning(item["notice"])
            else:
                self.counters["skipped"] += item["skipped"]
                self.counters["dropped"] += item["dropped"]
        while True:
            yield None

    def _all_ranks(self, has_batch: bool) -> bool:
        """True while every rank has a batch; raises on every rank when one met bad input."""
        state = -1 if self.error else int(has_batch)
        if self.world_size > 1:
            flag = torch.tensor([state], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            state = int(flag.item())
        if state < 0:
            raise InputError(self.error or "another rank stopped on bad input (see its error above)")
        return state == 1

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the shuffled tiles. Returns the epoch's mean losses and counts."""
        opts = self.opts
        self.stream.set_epoch(epoch)
        torch.manual_seed(epoch_seed(opts.seed, epoch, self.rank))
        self.model.train()
        self.counters = {"skipped": 0, "dropped": 0}
        self.error = None
        sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=self.device)
        window = torch.zeros_like(sums)
        steps, chips, window_steps, window_chips = 0, 0, 0, 0
        start = window_start = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{opts.max_epochs}", unit="step",
                   disable=not self.is_main, dynamic_ncols=True, leave=False)
        batches = self._batches()
        while self._all_ranks((batch := next(batches)) is not None):
            terms, lr = self.train_step(batch)
            values = torch.stack([terms.total.detach(), terms.cnn, terms.vit,
                                  terms.aux if terms.aux is not None else torch.zeros_like(terms.cnn)]).double()
            sums += values
            window += values
            steps, window_steps = steps + 1, window_steps + 1
            chips, window_chips = chips + len(batch["chips"]), window_chips + len(batch["chips"])
            bar.update(1)
            # Every log_interval steps, and after the first so that slow runs show a loss at once.
            if window_steps == opts.log_interval or steps == 1:
                self._log_window(window / window_steps, lr, window_chips / (time.perf_counter() - window_start), bar)
                window.zero_()
                window_steps, window_chips, window_start = 0, 0, time.perf_counter()
        bar.close()
        return self._epoch_stats(epoch, sums, steps, chips, time.perf_counter() - start)

    def train_step(self, batch: dict) -> tuple[LossTerms, float]:
        """One optimiser step on one batch at the poly learning rate of the current step."""
        lr = poly_lr(self.base_lr, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True).long()
        x = normalize_on_device(image, self.scale, self.shift)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            outputs = self.model(x, return_aux=True) if self.opts.aux_loss else self.model(x)
        terms = vcnet_loss(outputs[0], outputs[1], label, outputs[2] if self.opts.aux_loss else None)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        self.optimizer.step()
        self.step += 1
        return terms, lr

    def _log_window(self, means: torch.Tensor, lr: float, chips_per_s: float, bar: tqdm) -> None:
        values = means.tolist()
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"the loss is not finite at step {self.step} ({values[0]}); "
                                     "lower --base_lr or check the input data")
        if not self.is_main:
            return
        bar.set_postfix(loss=f"{values[0]:.4f}", lr=f"{lr:.2e}", chips_s=f"{chips_per_s * self.world_size:.3g}")
        for name, value in zip(LOSS_TERMS, values):
            if name != "loss_aux" or self.opts.aux_loss:
                self.writer.add_scalar(f"train/{name}", value, self.step)
        self.writer.add_scalar("train/lr", lr, self.step)
        self.writer.add_scalar("train/chips_per_s", chips_per_s * self.world_size, self.step)

    def _epoch_stats(self, epoch: int, sums: torch.Tensor, steps: int, chips: int, seconds: float) -> dict[str, Any]:
        counts = torch.tensor([steps, chips, self.counters["skipped"], self.counters["dropped"]],
                              dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            both = torch.cat([sums, counts])
            dist.all_reduce(both)
            sums, counts = both[:len(LOSS_TERMS)], both[len(LOSS_TERMS):]
            for buffer in self.model.module.buffers():
                dist.broadcast(buffer, src=0)
        total_steps, total_chips, skipped, dropped = (int(v) for v in counts.tolist())
        if total_steps == 0 and self.step == 0:
            raise InputError(f"{self.list_path}: no valid {self.opts.chip_size} chip in epoch {epoch + 1} "
                             "(no-data labels or all-zero pixels everywhere?)")
        means = (sums / max(total_steps, 1)).tolist()
        stats = {"epoch": epoch, "step": self.step, "steps": steps, "chips": total_chips, "skipped_chips": skipped,
                 "dropped_chips": dropped, "seconds": seconds, "chips_per_s": total_chips / max(seconds, 1e-9),
                 "lr": poly_lr(self.base_lr, max(self.step - 1, 0), self.total_steps)}
        stats.update({name: value for name, value in zip(LOSS_TERMS, means)})
        aux = f", aux {stats['loss_aux']:.4f}" if self.opts.aux_loss else ""
        self.log.info(f"epoch {epoch + 1}/{self.opts.max_epochs}: loss {stats['loss']:.4f} (cnn {stats['loss_cnn']:.4f}, "
                      f"vit {stats['loss_vit']:.4f}{aux}), lr {stats['lr']:.3g}, {steps} steps, {total_chips} chips "
                      f"({skipped} skipped, {dropped} dropped), {stats['chips_per_s']:.3g} chips/s, {seconds:.0f} s")
        if self.writer is not None:
            for key in LOSS_TERMS[: 4 if self.opts.aux_loss else 3] + ("chips_per_s", "skipped_chips"):
                self.writer.add_scalar(f"epoch/{key}", stats[key], epoch + 1)
        return stats

    # ------------------------------------------------------------------ validation and checkpoints
    def validate(self, epoch: int) -> dict[str, Any]:
        """Map the ``--val_list`` tiles (shared out over ranks) and score them against their HR
        references: overall accuracy and mIoU of the summed confusion matrix."""
        module = getattr(self.model, "module", self.model)
        folder = os.path.join(self.opts.savepath, "val")
        names = self.dataset.eval_names
        cm = np.zeros((len(names) - 1, len(names)), dtype=np.int64)
        for entry in self.val_entries[self.rank::self.world_size]:
            out = os.path.join(folder, output_name(entry.image))
            map_tile(module, entry.image, out, dataset=self.dataset, chip_size=self.opts.chip_size,
                     stride=self.opts.chip_size // 2, device=self.device, amp=self.amp, overwrite=True)
            cm += confusion_for_pair(out, entry.hr_label, self.dataset)
        if self.world_size > 1:
            total = torch.from_numpy(cm).to(self.device)
            dist.all_reduce(total)
            cm = total.cpu().numpy()
        metrics = compute_metrics(cm, names)
        result = {"val_overall_accuracy": metrics["overall_accuracy"], "val_mean_iou": metrics["mean_iou"]}
        self.log.info(f"validation after epoch {epoch + 1}: OA {format_metric(result['val_overall_accuracy'])}, "
                      f"mIoU {format_metric(result['val_mean_iou'])} ({len(self.val_entries)} tiles, HR reference)")
        if self.writer is not None:
            for key, value in result.items():
                if value is not None:
                    self.writer.add_scalar(f"val/{key[4:]}", value, epoch + 1)
        return result

    def checkpoint_extra(self, epoch: int, stats: dict[str, Any]) -> dict[str, Any]:
        """Plain-data entries a training checkpoint adds to the model, config and dataset."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "step": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "train_args": dataclasses.asdict(self.opts),
            "tiles": [os.path.basename(e.image) for e in self.entries],
            # Every stream is reseeded from (seed, epoch, ...) at each epoch start, which is what makes
            # resume exact; the generator states at the end of the epoch are kept for inspection.
            "rng": {"seed": self.opts.seed, "torch": "reseeded per (seed, epoch, rank) at each epoch start",
                    "sampling": "numpy generators of (seed, epoch, tile)",
                    "torch_cpu_state": torch.get_rng_state(),
                    "torch_cuda_states": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            "metrics": {k: v for k, v in stats.items() if isinstance(v, (int, float)) or v is None},
        }

    def save(self, epoch: int, stats: dict[str, Any]) -> list[str]:
        """Rank 0 writes ``epoch_{epoch}.pth`` (every ``--save_interval`` epochs from the first, and
        the last) and ``last.pth`` after every epoch, each atomically. Returns the paths written."""
        if not self.is_main:
            return []
        last = os.path.join(self.opts.savepath, "last.pth")
        save_checkpoint(last, model=self.model, model_config=self.model_config, dataset=self.dataset,
                        **self.checkpoint_extra(epoch, stats))
        written = [last]
        if epoch % self.opts.save_interval == 0 or epoch == self.opts.max_epochs - 1:
            path = os.path.join(self.opts.savepath, f"epoch_{epoch}.pth")
            with atomic_output(path) as tmp:
                shutil.copyfile(last, tmp)
            written.insert(0, path)
            self.log.info(f"saved {path}")
        return written

    def close(self) -> None:
        """Flush logs, release the process group this trainer created."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for handler in list(self.log.handlers):
            self.log.removeHandler(handler)
            handler.close()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
