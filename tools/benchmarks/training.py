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
import resource
import tempfile
import time

import torch

from networks.config import CONFIG_NAMES
from trainer import Trainer, TrainOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="sample", help="dataset definition (default: sample)")
    parser.add_argument("--list_dir", default=None, help="CSV list (default: the dataset's)")
    parser.add_argument("--model_config", default="vcnet", choices=CONFIG_NAMES)
    parser.add_argument("--chip_size", type=int, default=224)
    parser.add_argument("--chips_per_tile", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    parser.add_argument("--steps", type=int, default=10, help="timed batches (after 2 warm-up steps)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_batches(trainer: Trainer, steps: int, work) -> tuple[int, float]:
    """Run ``work`` on up to ``steps`` batches after two warm-up batches; (chips, seconds)."""
    chips, start = 0, None
    for index, item in enumerate(b for b in trainer.loader if "image" in b):
        if index == 2:
            _sync(trainer.device)
            start = time.perf_counter()
        work(item)
        if index >= 2:
            chips += len(item["chips"])
        if index == steps + 1:
            break
    _sync(trainer.device)
    return chips, (time.perf_counter() - start) if start is not None else float("nan")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as savepath:
        trainer = Trainer(TrainOptions(dataset=args.dataset, list_dir=args.list_dir, model_config=args.model_config,
                                       chip_size=args.chip_size, chips_per_tile=args.chips_per_tile,
                                       batch_size=args.batch_size, num_workers=args.num_workers,
                                       device=args.device, amp=args.amp, savepath=savepath, max_epochs=1))
        try:
            trainer.model.train()
            data_chips, data_s = _timed_batches(trainer, args.steps, lambda batch: None)
            train_chips, train_s = _timed_batches(trainer, args.steps, trainer.train_step)
        finally:
            trainer.close()
    device = trainer.device
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "model_config": args.model_config, "chip_size": args.chip_size,
        "batch_size": args.batch_size, "num_workers": args.num_workers, "amp_bf16": trainer.amp,
        "timed_steps": train_chips // max(args.batch_size, 1),
        "data_chips_per_s": round(data_chips / data_s, 2),
        "train_chips_per_s": round(train_chips / train_s, 3),
        "peak_host_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    for key, value in result.items():
        print(f"{key:>18}: {value}")
    return 0
