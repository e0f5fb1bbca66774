"""Training throughput: chip loading alone, then whole training steps (loader + model + optimiser).

Example::

    python tools/benchmark.py training --dataset sample --model_config tiny --chip_size 64 --steps 20
    python tools/benchmark.py training --dataset Chesapeake --batch_size 4 --num_workers 8 --amp --steps 50

Both figures come from the real ``Trainer`` on the listed tiles (windowed reads, no-data rule,
normalisation on the device). ``data_chips_per_s`` says whether the loader can feed the model:
it should be well above ``train_chips_per_s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time

import torch

from dataset.options import add_options, at_least, option, override
from training.chips import ChipBatch
from training.options import TrainOptions
from training.trainer import Trainer


@dataclasses.dataclass(kw_only=True)
class TrainingBenchmarkOptions(TrainOptions):
    """Every training option, with defaults for a short measurement, plus the number of timed steps."""

    dataset: str | None = override("sample")
    num_workers: int = override(2)
    steps: int = option(10, "timed batches (after 2 warm-up steps)", group="benchmark", check=at_least(1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, TrainingBenchmarkOptions)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_batches(trainer: Trainer, steps: int, work) -> tuple[int, float]:
    """Run ``work`` on up to ``steps`` batches after two warm-up batches; (chips, seconds)."""
    chips, start = 0, None
    for index, item in enumerate(b for b in trainer.loader if isinstance(b, ChipBatch)):
        if index == 2:
            _sync(trainer.device)
            start = time.perf_counter()
        work(item)
        if index >= 2:
            chips += len(item.chips)
        if index == steps + 1:
            break
    _sync(trainer.device)
    return chips, (time.perf_counter() - start) if start is not None else float("nan")


def run(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(TrainingBenchmarkOptions)}
    options = TrainingBenchmarkOptions(**{k: v for k, v in vars(args).items() if k in fields})
    options.check()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Trainer(dataclasses.replace(options, out_dir=out_dir, overwrite=True))
        try:
            trainer.model.train()
            data_chips, data_s = _timed_batches(trainer, options.steps, lambda batch: None)
            train_chips, train_s = _timed_batches(trainer, options.steps, trainer.train_step)
        finally:
            trainer.close()
    device = trainer.device
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "model_config": options.model_config,
        "chip_size": options.chip_size, "batch_size": options.batch_size, "num_workers": options.num_workers,
        "amp_bf16": trainer.amp, "timed_steps": train_chips // max(options.batch_size, 1),
        "data_chips_per_s": round(data_chips / data_s, 2),
        "train_chips_per_s": round(train_chips / train_s, 3),
        "peak_host_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    for key, value in result.items():
        print(f"{key:>18}: {value}")
    return 0
