"""test.py sliding-window mapping: peak host memory and speed on a large generated tile.

Writes a random ``bands x H x W`` uint8 GeoTIFF (strip by strip, so writing it needs little
memory), then maps it with :func:`mapping.writer.map_tile` and reports, per size:

* ``rss_before``: resident memory just before mapping (model, libraries, GDAL cache so far);
* ``peak_rss``: the process's peak resident memory during mapping (Linux ``VmHWM``, reset before
  each run through ``/proc/self/clear_refs``; falls back to ``ru_maxrss``);
* ``numpy_peak``: peak of memory allocated through Python and NumPy (``tracemalloc``);
* the memory the published whole-tile approach would need for comparison: the tile as float32
  plus a 17-channel float32 accumulator and its counts (docs/design.md §10, defects 4-5).

``--model stub`` replaces the network by two 1x1 convolutions, so the run measures tiling,
stitching and I/O alone, fast enough for a 10,000 x 10,000 tile on a laptop CPU; ``--model tiny``
uses the tiny VCNet and ``--checkpoint`` a real one.

Example::

    python tools/benchmark.py mapping --size 2000 --size 10000 --model stub
"""

from __future__ import annotations

import argparse
import dataclasses
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

from dataset.options import add_options, option
from mapping.options import SlidingWindowOptions

MB = 1 << 20


@dataclasses.dataclass(kw_only=True)
class MappingBenchmarkOptions(SlidingWindowOptions):
    """The sliding-window options of test.py, plus the test tile and model of the benchmark."""

    size: list[int] = option(default_factory=lambda: [10000], group="benchmark",
                             help="side(s) of the square test tile in pixels (default: 10000)")
    model: str = option("stub", "stub: two 1x1 convolutions (I/O and stitching only); tiny: the tiny VCNet",
                        choices=("stub", "tiny"), group="benchmark")
    checkpoint: str | None = option(None, "map with this checkpoint instead of --model", group="benchmark")
    device: str = option("cpu", "cpu, cuda or cuda:N", group="benchmark")
    save_probs: bool = option(False, "also write the probability raster", group="benchmark")
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
    if args.model == "tiny":
        from networks import build_model, get_tiny_config

        torch.manual_seed(0)
        return build_model(get_tiny_config()).eval().to(args.device), dataset
    return _Stub(dataset.num_bands, dataset.num_classes).eval().to(args.device), dataset


def run(args: argparse.Namespace) -> int:
    from mapping.sliding_window import chip_offsets
    from mapping.writer import map_tile

    fields = {f.name for f in dataclasses.fields(MappingBenchmarkOptions)}
    # The benchmark's options, checked as test.py checks its own.
    args = MappingBenchmarkOptions(**{k: v for k, v in vars(args).items() if k in fields})
    args.check()
    sizes = args.size
    model, dataset = _model(args)
    workdir = args.workdir or tempfile.mkdtemp(prefix="vcnet_mapping_bench_")
    os.makedirs(workdir, exist_ok=True)
    print(f"model {args.checkpoint or args.model}, chip {args.chip_size}, stride {args.stride}, "
          f"batch {args.batch_size}, device {args.device}, torch threads {torch.get_num_threads()}")
    header = (f"{'tile':>13} {'chips':>7} {'seconds':>8} {'chips/s':>8} {'rss_before':>11} {'peak_rss':>9} "
              f"{'peak-before':>12} {'numpy_peak':>11} {'published':>10}")
    print(header)
    for size in sizes:
        image = os.path.join(workdir, f"bench_{size}_naip.tif")
        out = os.path.join(workdir, f"bench_{size}_predictions.tif")
        probs = os.path.join(workdir, f"bench_{size}_probs.tif") if args.save_probs else None
        if not os.path.isfile(image):
            _write_tile(image, size, dataset.num_bands)
        chips = len(chip_offsets(size, args.chip_size, args.stride)) ** 2
        exact = _reset_peak()
        before = _status_kb("VmRSS") or 0
        tracemalloc.start()
        start = time.perf_counter()
        map_tile(model, image, out, dataset=dataset, chip_size=args.chip_size, stride=args.stride,
                 batch_size=args.batch_size, device=args.device, overwrite=True, probs_path=probs,
                 num_workers=args.num_workers)
        seconds = time.perf_counter() - start
        _, numpy_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peak = _status_kb("VmHWM") if exact else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        published = (dataset.num_bands + 17 + 1) * 4 * size * size
        print(f"{size:>6}x{size:<6} {chips:>7} {seconds:>8.1f} {chips / seconds:>8.1f} {before / 1024:>9.0f}MB "
              f"{peak / 1024:>7.0f}MB {(peak - before) / 1024:>10.0f}MB {numpy_peak / MB:>9.0f}MB "
              f"{published / MB:>8.0f}MB")
        for path in (image, out, probs):
            if path and not args.workdir and os.path.exists(path):
                os.remove(path)
    if not exact:
        print("note: peak_rss is the process lifetime peak (ru_maxrss); /proc/self/clear_refs was not writable")
    return 0
