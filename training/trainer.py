"""The training loop of VCNet (docs/design.md §6, defects 6-13 fixed): epochs, steps, validation, checkpoints.

:class:`Trainer` puts together what the other modules of :mod:`training` provide: the options
(:mod:`training.options`), the processes (:mod:`training.distributed`), the log
(:mod:`training.logger`), the run folder and resume checks (:mod:`training.run_folder`), and the
checked tiles, model, optimiser and chip loader (:mod:`training.builders`), the epoch's loss
bookkeeping (:mod:`training.progress`) and validation (:mod:`training.validation`).

Reproducibility: model initialisation uses ``torch.manual_seed(seed)``. Tile order and chip
positions come from explicit generators of ``(seed, epoch, tile)`` (:mod:`training.sampling`). The
global torch RNG, which dropout draws from, is reseeded at the start of every epoch from
``(seed, epoch, rank)``. So a run resumed from ``last.pth`` continues with exactly the chips, the
dropout masks and the learning rates of the uninterrupted run, and different ranks draw
different dropout masks.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

from dataset import load_dataset
from dataset.errors import InputError
from networks.label_model import LabelModelVote
from scoring.report import format_metric
from training import builders
from training.augment import random_d4, random_jitter
from training.chips import ChipBatch, StreamError, TileNotice, WorkerDone, normalization_constants, normalize_on_device
from training.distributed import DistributedContext
from training.logger import RunLogger
from training.losses import LossTerms
from training.options import TrainOptions
from training.progress import LOSS_TERMS, EpochMeter
from training.run_folder import (
    RunFolder,
    check_resumed_config,
    check_resumed_tiles,
    extended_horizon,
    read_resume,
    run_config,
    training_state,
)
from training.sampling import make_rng, poly_lr, published_lr, steps_per_epoch
from training.validation import validate

_DROPOUT_STREAM = 2


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the global torch RNG (dropout) for one epoch on one rank."""
    return int(make_rng(seed, _DROPOUT_STREAM, epoch, rank).integers(2**62))


class Trainer:
    """One training run. ``Trainer(options).fit()`` trains and returns a summary.

    Construction does every check that can be done up front (options, dataset, list, every tile,
    the resume checkpoint), so bad input fails before the first step. Under ``torchrun`` the
    process group is created here and destroyed by :meth:`close`.
    """

    def __init__(self, options: TrainOptions) -> None:
        self.opts = options
        options.check()
        self.ctx = DistributedContext(options.device, options.gpu)
        self.device = self.ctx.device
        self.folder = RunFolder(options.out_dir)
        self.log: RunLogger | None = None
        try:
            self._setup_runtime()
            self.dataset = load_dataset(options.dataset)
            self.resume_from = read_resume(options, self.dataset)
            self.list_path, self.entries = builders.training_tiles(options, self.dataset, self.ctx, self.log)
            check_resumed_tiles(self.resume_from, builders.tile_names(self.entries), self.list_path, options.resume)
            self.val_entries = builders.validation_tiles(options, self.dataset, self.ctx, self.log)
            self.model_config = builders.model_config(options, self.dataset)
            check_resumed_config(self.resume_from, self.model_config, options)
            self.model = builders.model(options, self.model_config, self.ctx, self.log, self.resume_from)
            self.optimizer = builders.optimizer(self.model, options)
            self.loss = builders.loss(options, self.dataset, self.entries, self.ctx, self.log)
            self.refiner = builders.label_refiner(options, self.dataset, self.entries, self.device, self.log,
                                                  self.resume_from)
            self.stream, self.loader = builders.chip_loader(self.entries, self.dataset, options, self.ctx, self.log)
            self.base_lr = published_lr(options.base_lr, options.batch_size)
            self.steps_per_epoch = steps_per_epoch(len(self.entries), options.chips_per_tile, options.batch_size,
                                                   self.ctx.world_size, options.num_workers)
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
            self._write_run_config()
        except BaseException as exc:
            self.close(exc)
            raise

    def _setup_runtime(self) -> None:
        opts = self.opts
        if opts.amp and self.device.type != "cuda":
            print("warning: --amp needs CUDA; training in float32 on the CPU", file=sys.stderr)
        self.amp = opts.amp and self.device.type == "cuda"
        self.ctx.start()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not opts.deterministic
        if opts.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
            torch.use_deterministic_algorithms(True, warn_only=True)
        set_aside = None
        if self.ctx.is_main:
            set_aside = self.folder.claim(opts)
        else:
            self.folder.refuse_existing_run(opts)
        self.log = RunLogger(self.folder.path, self.ctx.rank, self.ctx.world_size)
        if set_aside:
            self.log.info(set_aside)

    def _restore(self, payload: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(payload["optimizer"])
        self.start_epoch = int(payload["epoch"]) + 1
        self.step = int(payload["step"])
        self.total_steps = extended_horizon(payload, self.opts.max_epochs, self.steps_per_epoch)
        if int(payload.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
            self.log.warning("the number of processes or loader workers differs from the checkpoint's: the run "
                             "continues the same schedule but its batches are not those of the original run")
        planned = int(payload["train_args"]["max_epochs"])
        if self.opts.max_epochs != planned:
            before = poly_lr(self.base_lr, self.step, int(payload["total_steps"]))
            after = poly_lr(self.base_lr, self.step, self.total_steps)
            self.log.info(f"extending the run from {planned} to {self.opts.max_epochs} epochs: the poly schedule is "
                          f"re-planned from step {self.step} to the new horizon {self.total_steps} (was "
                          f"{payload['total_steps']}); lr at step {self.step} is {after:.3g} (was {before:.3g})")

    def _announce(self) -> None:
        opts = self.opts
        params = sum(p.numel() for p in self.model.parameters())
        scaled = f" (published scaling of {opts.base_lr} for batch {opts.batch_size})" \
            if self.base_lr != opts.base_lr else ""
        self.log.info(f"dataset {self.dataset.name}: {len(self.entries)} tiles from {self.list_path}")
        self.log.info(f"model {opts.model_config} (CNN width {self.model_config.l2hnet.width}), {params:,} parameters, "
                      f"device {self.device}, {self.ctx.world_size} process(es), amp {self.amp}")
        self.log.info(f"{opts.max_epochs} epochs x {self.steps_per_epoch} steps at most = poly horizon "
                      f"{self.total_steps} steps, base lr {self.base_lr:g}{scaled}")
        if self.resume_from is not None:
            done = " (all epochs are done)" if self.start_epoch >= opts.max_epochs else ""
            self.log.info(f"resumed from {opts.resume}: epoch {self.start_epoch + 1}, step {self.step}{done}")

    def _write_run_config(self) -> None:
        """Rank 0 writes every setting of the run to the run folder before the first step."""
        if not self.ctx.is_main:
            return
        schedule = {"start_epoch": self.start_epoch, "start_step": self.step, "steps_per_epoch": self.steps_per_epoch,
                    "total_steps": self.total_steps, "base_lr": self.base_lr}
        config = run_config(options=self.opts, model_config=self.model_config, dataset=self.dataset,
                            list_path=self.list_path, tiles=builders.tile_names(self.entries), schedule=schedule,
                            processes=self.ctx.world_size, device=self.device)
        self.log.info(f"settings written to {self.folder.write_run_config(self.start_epoch, config)}")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs. Returns the last epoch's statistics and checkpoint paths."""
        summary: dict[str, Any] = {"epochs": [], "checkpoints": []}
        try:
            for epoch in range(self.start_epoch, self.opts.max_epochs):
                stats = self.train_epoch(epoch)
                last = epoch == self.opts.max_epochs - 1
                if self.val_entries and ((epoch + 1) % self.opts.val_interval == 0 or last):
                    stats.update(self.validate(epoch))
                summary["epochs"].append(stats)
                summary["checkpoints"].extend(self.save(epoch, stats))
            summary["step"] = self.step
        except BaseException as exc:
            self.close(exc)
            raise
        self.close()
        return summary

    def _batches(self) -> Iterator[ChipBatch | None]:
        """Batches of this rank; yields None when the rank is out of data. Notices are logged once
        per tile; a stream error is kept in ``self.error`` for :meth:`DistributedContext.all_have_batch`."""
        for item in self.loader:
            if isinstance(item, ChipBatch):
                self.counters["skipped"] += item.skipped
                yield item
            elif isinstance(item, StreamError):
                self.error = item.message
                break
            elif isinstance(item, TileNotice):
                if item.tile not in self._reported:
                    self._reported.add(item.tile)
                    self.log.warning(item.message)
            elif isinstance(item, WorkerDone):
                self.counters["skipped"] += item.skipped
                self.counters["dropped"] += item.dropped
        while True:
            yield None

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the shuffled tiles. Returns the epoch's mean losses and counts."""
        opts = self.opts
        self.stream.set_epoch(epoch)
        torch.manual_seed(epoch_seed(opts.seed, epoch, self.ctx.rank))
        self.model.train()
        self.counters = {"skipped": 0, "dropped": 0}
        self.error: str | None = None
        meter = EpochMeter(self.device)
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{opts.max_epochs}", unit="step",
                   disable=not self.ctx.is_main, dynamic_ncols=True, leave=False)
        batches = self._batches()
        with bar:  # closed on an error too, so that the error gets a line of its own
            while self.ctx.all_have_batch((batch := next(batches)) is not None, self.error):
                terms, lr = self.train_step(batch)
                meter.add(terms, len(batch.chips))
                bar.update(1)
                if meter.window_due(opts.log_interval):
                    try:
                        self._log_window(meter, lr, bar)
                    except FloatingPointError as exc:
                        raise self._diverged(str(exc), lr) from None
        return self._epoch_stats(epoch, meter)

    def train_step(self, batch: ChipBatch) -> tuple[LossTerms, float]:
        """One optimiser step on one batch at the poly learning rate of the current step."""
        lr = poly_lr(self.base_lr, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        image = batch.image.to(self.device, non_blocking=True)
        label = batch.label.to(self.device, non_blocking=True).long()
        codes = batch.codes.to(self.device, non_blocking=True).long() if batch.codes is not None else None
        if self.opts.augment == "d4":
            image, label, codes = random_d4(image, label, codes)
        x = normalize_on_device(image, self.scale, self.shift)
        if self.refiner is not None:
            label = self.refiner(x, codes, label)
        x = random_jitter(x, self.opts.jitter)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            outputs = self.model(x, return_aux=True) if self.opts.aux_loss else self.model(x)
        terms = self.loss(outputs, label, codes)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        self.optimizer.step()
        self.step += 1
        return terms, lr

    def _log_window(self, meter: EpochMeter, lr: float, bar: tqdm) -> None:
        terms, chips_per_s = meter.take_window(self.step)
        if not self.ctx.is_main:
            return
        chips_per_s *= self.ctx.world_size
        bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{lr:.2e}", chips_s=f"{chips_per_s:.3g}")
        if not self.opts.aux_loss:
            del terms["loss_aux"]
        self.log.scalars("train", {**terms, "lr": lr, "chips_per_s": chips_per_s}, self.step)

    def _epoch_stats(self, epoch: int, meter: EpochMeter) -> dict[str, Any]:
        """The epoch's figures summed over the ranks, logged; BatchNorm buffers made equal on all ranks."""
        seconds = meter.seconds()
        counts = torch.tensor([meter.steps, meter.chips, self.counters["skipped"], self.counters["dropped"]],
                              dtype=torch.float64, device=self.device)
        both = self.ctx.sum(torch.cat([meter.sums, counts]))
        sums, counts = both[:len(LOSS_TERMS)], both[len(LOSS_TERMS):]
        self.ctx.share_buffers(getattr(self.model, "module", self.model))
        total_steps, total_chips, skipped, dropped = (int(v) for v in counts.tolist())
        if total_steps == 0 and self.step == 0:
            raise InputError(f"{self.list_path}: no valid {self.opts.chip_size} chip in epoch {epoch + 1} "
                             "(no-data labels or all-zero pixels everywhere?)")
        stats = {"epoch": epoch, "step": self.step, "steps": meter.steps, "chips": total_chips,
                 "skipped_chips": skipped, "dropped_chips": dropped, "seconds": seconds,
                 "chips_per_s": total_chips / max(seconds, 1e-9),
                 "lr": poly_lr(self.base_lr, max(self.step - 1, 0), self.total_steps)}
        stats.update(zip(LOSS_TERMS, (sums / max(total_steps, 1)).tolist()))
        if not math.isfinite(stats["loss"]):  # steps after the last logging window: never save such weights
            raise self._diverged(f"the loss is not finite in epoch {epoch + 1} (mean {stats['loss']}, up to step "
                                 f"{self.step})", stats["lr"])
        aux = f", aux {stats['loss_aux']:.4f}" if self.opts.aux_loss else ""
        self.log.info(f"epoch {epoch + 1}/{self.opts.max_epochs}: loss {stats['loss']:.4f} "
                      f"(cnn {stats['loss_cnn']:.4f}, vit {stats['loss_vit']:.4f}{aux}), lr {stats['lr']:.3g}, "
                      f"{meter.steps} steps, {total_chips} chips ({skipped} skipped, {dropped} dropped), "
                      f"{stats['chips_per_s']:.3g} chips/s, {seconds:.0f} s")
        logged = LOSS_TERMS[: 4 if self.opts.aux_loss else 3] + ("chips_per_s", "skipped_chips")
        self.log.scalars("epoch", {key: stats[key] for key in logged}, epoch + 1)
        return stats

    def _diverged(self, what: str, lr: float) -> InputError:
        """The one-line error of a diverged run: where, at which lr, and what is left on disk."""
        last = self.folder.last
        kept = f"the run's last checkpoint {last} (written before the divergence) is intact" \
            if os.path.isfile(last) else "no checkpoint was written"
        return InputError(f"{what} at lr {lr:.3g}: lower --base_lr or check the input data; {kept}")

    # ------------------------------------------------------------------ validation and checkpoints
    def mapping_model(self) -> torch.nn.Module:
        """The network as the run's maps use it (``test.py`` on its checkpoint): unwrapped from DDP, with the
        label model voting under ``--label_model_weight``."""
        network = getattr(self.model, "module", self.model)
        if self.opts.label_model_weight and self.refiner is not None:
            return LabelModelVote(network, self.refiner.model, self.opts.label_model_weight)
        return network

    def validate(self, epoch: int) -> dict[str, Any]:
        """Map and score the ``--val_list`` tiles (:func:`training.validation.validate`) and log it."""
        result = validate(self.mapping_model(), self.val_entries, self.dataset, chip_size=self.opts.chip_size,
                          folder=self.folder.val, ctx=self.ctx, amp=self.amp, guided_filter=self.opts.guided_filter)
        self.log.info(f"validation after epoch {epoch + 1}: OA {format_metric(result['val_overall_accuracy'])}, "
                      f"mIoU {format_metric(result['val_mean_iou'])} ({len(self.val_entries)} tiles, HR reference)")
        self.log.scalars("val", {key[4:]: value for key, value in result.items()}, epoch + 1)
        return result

    def save(self, epoch: int, stats: dict[str, Any]) -> list[str]:
        """Rank 0 writes ``last.pth`` after every epoch and ``epoch_{epoch}.pth`` every
        ``--save_interval`` epochs from the first, and after the last. Returns the paths written."""
        if not self.ctx.is_main:
            return []
        keep = epoch % self.opts.save_interval == 0 or epoch == self.opts.max_epochs - 1
        state = training_state(options=self.opts, optimizer=self.optimizer, epoch=epoch, step=self.step,
                               total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                               tiles=builders.tile_names(self.entries), device=self.device, metrics=stats)
        if self.refiner is not None:
            state["label_model"] = self.refiner.model.state_dict()
        written = self.folder.save(epoch, keep_epoch=keep, model=self.model, model_config=self.model_config,
                                   dataset=self.dataset, state=state)
        if keep:
            self.log.info(f"saved {written[0]}")
        return written

    def close(self, failure: BaseException | None = None) -> None:
        """Record ``failure`` in train.log, flush logs, release the folder lock and the process group."""
        if self.log is not None:
            if failure is not None:
                self.log.failure(failure)
            self.log.close()
        self.folder.release()
        self.ctx.close()
