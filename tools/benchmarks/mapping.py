"""test.py sliding-window mapping: peak host memory and speed on a large generated tile.

Writes a random ``bands x H x W`` uint8 GeoTIFF (strip by strip, so writing it needs little
memory), then maps it with :func:`mapping.writer.map_tile` and reports, per size:

* ``rss_before``: resident memory just before mapping (model, libraries, GDAL cache so far);
* ``peak_rss``: the process's peak resident memory during mapping (Linux ``VmHWM``, reset before
  each run through ``/proc/self/clear_refs``; falls back to ``ru_maxrss``);
* ``numpy_peak``: peak of memory allocated through Python and NumPy (``tracemalloc``);
* ``cpu_ms/chip``: process CPU time (all threads) per chip, steadier than seconds on a busy machine;
* the memory the published whole-tile approach would need for comparison: the tile as float32
  plus a 17-channel float32 accumulator and its counts (docs/design.md §10, defects 4-5).

``--model null`` returns fixed logits at no cost, so the run measures the pipeline alone (reading,
normalisation, softmax, blending, argmax, writing): its ceiling. ``--model stub`` replaces the
network by two 1x1 convolutions, fast enough for a 10,000 x 10,000 tile on a laptop CPU;
``--model tiny`` uses the tiny VCNet and ``--checkpoint`` a real one. ``km2/s`` counts the test
tile's 1 m pixels.

Example::

    python tools/benchmark.py mapping --size 2000 --size 10000 --model stub
    python tools/benchmark.py mapping --size 3000 --model null --repeats 3   # the pipeline's own ceiling
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import tempfile
import time
import tracemalloc

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from dataset.options import add_options, at_least, option
from mapping.options import SlidingWindowOptions

MB = 1 << 20


@dataclasses.dataclass(kw_only=True)
class MappingBenchmarkOptions(SlidingWindowOptions):
    """The sliding-window options of test.py, plus the test tile and model of the benchmark."""

    size: list[int] = option(default_factory=lambda: [10000], group="benchmark",
                             help="side(s) of the square test tile in pixels (default: 10000)")
    model: str = option("stub", "null: fixed logits at no cost (the pipeline's own ceiling); stub: two 1x1 "
                        "convolutions; tiny / vcnet: the tiny / published-size VCNet, random weights",
                        choices=("null", "stub", "tiny", "vcnet"), group="benchmark")
    checkpoint: str | None = option(None, "map with this checkpoint instead of --model", group="benchmark")
    device: str = option("cpu", "cpu, cuda or cuda:N", group="benchmark")
    amp: bool = option(False, "bfloat16 autocast of the model (CUDA only)", group="benchmark")
    save_probs: bool = option(False, "also write the probability raster", group="benchmark")
    guided_filter: int = option(0, "radius of the image-guided filter of each chip's probabilities (as test.py's); "
                                   "0 is off", group="benchmark", check=at_least(0))
    label_model_weight: float = option(0.0, "with --model tiny / vcnet: the model votes with a label model of five "
                                            "members with NDVI, as --recipe robust's (random weights), at this "
                                            "weight; 0 is off (a --checkpoint maps with its own)",
                                       group="benchmark", check=at_least(0))
    repeats: int = option(1, "timed runs per size; the fastest is reported (memory: the first)", group="benchmark",
                          check=at_least(1))
    json: str | None = option(None, "also write the results to this JSON file", group="benchmark")
    workdir: str | None = option(None, "where to write the tiles", group="benchmark",
                                 none_means="a temporary folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, MappingBenchmarkOptions)


class _Stub(torch.nn.Module):
    """(vit, cnn) logits from two 1x1 convolutions: the cost of everything but the network."""

    def __init__(self, bands: int, classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.vit = torch.nn.Conv2d(bands, classes, 1)
        self.cnn = torch.nn.Conv2d(bands, classes, 1)

    def forward(self, x):
        return self.vit(x), self.cnn(x)


class _Null(torch.nn.Module):
    """The same fixed (vit, cnn) logits for every chip: a network that costs nothing, so the run
    measures reading, normalisation, softmax, blending, argmax and writing alone. The logits vary
    smoothly over the chip (bilinear from a 4 x 4 grid), so the map compresses like a real one."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes
        self.register_buffer("anchor", torch.zeros(()))  # gives the model a device
        self.outputs: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x):
        shape = (x.shape[0], self.classes, *x.shape[2:])
        if shape not in self.outputs:
            generator = torch.Generator().manual_seed(0)
            coarse = torch.randn(2, 1, self.classes, 4, 4, generator=generator).expand(2, shape[0], -1, -1, -1)
            fine = torch.nn.functional.interpolate(coarse.flatten(0, 1), size=shape[2:], mode="bilinear")
            self.outputs[shape] = tuple(fine.view(2, *shape).to(x.device).unbind(0))
        return self.outputs[shape]


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _write_tile(path: str, size: int, bands: int) -> None:
    rng = np.random.default_rng(0)
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype="uint8", crs="EPSG:26918",
                   transform=from_origin(500000.0, 4700000.0, 1.0, 1.0), tiled=True, blockxsize=256,
                   blockysize=256, BIGTIFF="IF_SAFER")
    with rasterio.Env(GDAL_CACHEMAX=64 << 20), rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, 256):
            h = min(256, size - row)
            dst.write(rng.integers(0, 256, size=(bands, h, size), dtype=np.uint8), window=Window(0, row, size, h))


def _model(args, dataset_name: str = "sample"):
    from dataset import load_dataset

    if args.checkpoint:
        from networks import load_model

        model = load_model(args.checkpoint, device=args.device)
        return model, model.dataset
    dataset = load_dataset(dataset_name)
    if args.model in ("tiny", "vcnet"):
        from networks import build_model, get_config

        torch.manual_seed(0)
        model = build_model(get_config(args.model))
        if args.label_model_weight:
            from networks.label_model import BaggedLabelModel, LabelModelVote, NdviBand
            from training.builders import REFINE_BAGS

            ndvi = NdviBand(dataset.bands.index("red"), dataset.bands.index("nir"), dataset.mean, dataset.std)
            label_model = BaggedLabelModel.empty(dataset.num_bands, dataset.num_classes, REFINE_BAGS, ndvi)
            model = LabelModelVote(model, label_model, args.label_model_weight)
        return model.eval().to(args.device), dataset
    if args.model == "null":
        return _Null(dataset.num_classes).eval().to(args.device), dataset
    return _Stub(dataset.num_bands, dataset.num_classes).eval().to(args.device), dataset


def run(args: argparse.Namespace) -> int:
    from mapping.sliding_window import chip_offsets
    from mapping.writer import map_tile

    fields = {f.name for f in dataclasses.fields(MappingBenchmarkOptions)}
    # The benchmark's options, checked as test.py checks its own.
    args = MappingBenchmarkOptions(**{k: v for k, v in vars(args).items() if k in fields})
    args.check()
    sizes = args.size
    from runtime.device import prepare_device

    prepare_device(torch.device(args.device))
    model, dataset = _model(args)
    workdir = args.workdir or tempfile.mkdtemp(prefix="vcnet_mapping_bench_")
    os.makedirs(workdir, exist_ok=True)
    print(f"model {args.checkpoint or args.model}, chip {args.chip_size}, stride {args.stride}, "
          f"batch {args.batch_size}, device {args.device}, torch threads {torch.get_num_threads()}")
    header = (f"{'tile':>13} {'chips':>7} {'seconds':>8} {'chips/s':>8} {'km2/s':>7} {'rss_before':>11} "
              f"{'peak_rss':>9} {'peak-before':>12} {'numpy_peak':>11} {'published':>10}")
    print(header)
    results = []
    for size in sizes:
        image = os.path.join(workdir, f"bench_{size}_naip.tif")
        out = os.path.join(workdir, f"bench_{size}_predictions.tif")
        probs = os.path.join(workdir, f"bench_{size}_probs.tif") if args.save_probs else None
        if not os.path.isfile(image):
            _write_tile(image, size, dataset.num_bands)
        chips = len(chip_offsets(size, args.chip_size, args.stride)) ** 2
        times, cpu_times = [], []
        for attempt in range(args.repeats):
            if attempt == 0:
                exact = _reset_peak()
                before = _status_kb("VmRSS") or 0
                tracemalloc.start()
            start, cpu_start = time.perf_counter(), time.process_time()
            map_tile(model, image, out, dataset=dataset, chip_size=args.chip_size, stride=args.stride,
                     batch_size=args.batch_size, device=args.device, amp=args.amp, overwrite=True, probs_path=probs,
                     num_workers=args.num_workers, guided_filter=args.guided_filter)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            if attempt == 0:
                _, numpy_peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                peak = _status_kb("VmHWM") if exact else None
                if peak is None:
                    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seconds = min(times)
        km2 = size * size * 1e-6  # the test tile has 1 m pixels
        published = (dataset.num_bands + 17 + 1) * 4 * size * size
        print(f"{size:>6}x{size:<6} {chips:>7} {seconds:>8.2f} {chips / seconds:>8.1f} {km2 / seconds:>7.2f} "
              f"{1000 * min(cpu_times) / chips:>11.2f} "
              f"{before / 1024:>9.0f}MB {peak / 1024:>7.0f}MB {(peak - before) / 1024:>10.0f}MB "
              f"{numpy_peak / MB:>9.0f}MB {published / MB:>8.0f}MB")
        results.append({"size": size, "chips": chips, "seconds": [round(t, 3) for t in times],
                        "chips_per_s": round(chips / seconds, 1), "km2_per_s": round(km2 / seconds, 3),
                        "cpu_ms_per_chip": round(1000 * min(cpu_times) / chips, 3),
                        "peak_rss_minus_before_mib": round((peak - before) / 1024)})
        for path in (image, out, probs):
            if path and not args.workdir and os.path.exists(path):
                os.remove(path)
    if args.json:
        device = torch.device(args.device)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"model": args.checkpoint or args.model, "chip_size": args.chip_size, "stride": args.stride,
                       "batch_size": args.batch_size, "num_workers": args.num_workers, "amp_bf16": args.amp,
                       "guided_filter": args.guided_filter, "label_model_weight": args.label_model_weight,
                       "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch_threads": torch.get_num_threads(), "results": results}, fh, indent=2)
    if not exact:
        print("note: peak_rss is the process lifetime peak (ru_maxrss); /proc/self/clear_refs was not writable")
    return 0
