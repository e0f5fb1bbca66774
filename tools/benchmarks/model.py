"""Model cost: parameters, GFLOPs per chip, forward and training-step speed and peak memory.

Example::

    python tools/benchmark.py model --config vcnet --chip_size 224 --batch_size 2 --device cpu

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-accumulate;
grid-sample, softmax, norms and interpolation are not counted), as in docs/design.md §5.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from networks import build_model, get_config
from networks.config import CONFIG_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="vcnet", choices=CONFIG_NAMES, help="model config (default vcnet)")
    parser.add_argument("--chip_size", type=int, default=224, help="chip side in pixels (multiple of 32)")
    parser.add_argument("--batch_size", type=int, default=2, help="chips per step for the timings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--fused_attention", action="store_true", help="F.scaled_dot_product_attention in ViT blocks")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--json", help="also write the results to this JSON file")


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    config = get_config(args.config)
    config.vit.fused_attention = args.fused_attention
    model = build_model(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    chip = torch.randn(1, config.in_channels, args.chip_size, args.chip_size, device=device)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(chip)
    gflops = counter.get_total_flops() / 1e9

    batch = torch.randn(args.batch_size, config.in_channels, args.chip_size, args.chip_size, device=device)
    target = torch.randint(1, config.num_classes, (args.batch_size, args.chip_size, args.chip_size), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def forward():
        with torch.no_grad(), autocast:
            model(batch)

    def train_step():
        with autocast:
            vit, cnn = model(batch)
            loss = 0.5 * F.cross_entropy(cnn.float(), target, ignore_index=0) + \
                0.5 * F.cross_entropy(vit.float(), target, ignore_index=0)
        loss.backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.eval()
    forward_s = _timed(forward, args.repeats, device)
    model.train()
    train_s = _timed(train_step, args.repeats, device)
    result = {
        "config": args.config, "device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "torch_threads": torch.get_num_threads(), "chip_size": args.chip_size, "batch_size": args.batch_size,
        "amp_bf16": args.amp, "fused_attention": args.fused_attention, "parameters": params,
        "gflops_per_chip": round(gflops, 2),
        "forward_chips_per_s": round(args.batch_size / forward_s, 3),
        "train_chips_per_s": round(args.batch_size / train_s, 3),
        "peak_host_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0
