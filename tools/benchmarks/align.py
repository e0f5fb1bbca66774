"""Memory and time of `prepare_data.py align` on a 10,000 x 10,000 tile and a continental LR raster.

Example::

    python tools/benchmark.py align --work_dir /tmp/vcnet_align_bench

Generates (once, in ``--work_dir``; nothing lands in the repository):

* an HR tile of ``--tile_size`` x ``--tile_size`` pixels at 1 m in EPSG:26917 (4 bands, uint8);
* an LR raster on the NLCD CONUS grid (EPSG:5070, 30 m, 161,190 x 104,424 pixels: 16.8 GB as a
  plain uint8 array), tiled and deflate-compressed. Only the blocks around the tile hold data
  (blocky random NLCD codes); the rest is sparse, i.e. no data, so the file stays small while
  GDAL sees the full continental raster.

Then runs ``align`` in a child process and reports its wall time and peak RSS (the child's own
high-water mark, ``VmHWM``; ``resource.getrusage`` where /proc is missing) next to the peak RSS of
a child that only imports the tool, so the difference is what the alignment itself holds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from rasterio.windows import from_bounds

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NLCD_GRID = dict(crs="EPSG:5070", transform=from_origin(-2493045.0, 3310005.0, 30.0, 30.0), width=161190,
                 height=104424)
NLCD_CODES = np.array([11, 21, 22, 23, 24, 31, 41, 42, 43, 52, 71, 81, 82, 90, 95], dtype=np.uint8)
TILE_ORIGIN = (600000.0, 4300000.0)  # EPSG:26917, northern Virginia


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work_dir", default="/tmp/vcnet_align_bench", help="where the generated rasters go")
    parser.add_argument("--tile_size", type=int, default=10000, help="HR tile side in pixels (1 m)")
    parser.add_argument("--window", type=int, default=1024, help="align --window")
    parser.add_argument("--cache_mb", type=int, default=256, help="align --cache_mb")
    parser.add_argument("--resampling", default="nearest", choices=("nearest", "mode"))


def _make_tile(path: str, size: int) -> None:
    profile = dict(driver="GTiff", width=size, height=size, count=4, dtype="uint8", crs="EPSG:26917",
                   transform=from_origin(*TILE_ORIGIN, 1.0, 1.0), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", SPARSE_OK=True, BIGTIFF="YES")
    with rasterio.open(path, "w", **profile):
        pass  # align reads only the grid; unwritten blocks read as 0


def _make_lr(path: str, tile_size: int) -> tuple[int, int]:
    """Continental LR raster with data around the tile; returns the (rows, cols) written."""
    profile = dict(driver="GTiff", count=1, dtype="uint8", nodata=0, tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", SPARSE_OK=True, BIGTIFF="YES", **NLCD_GRID)
    x0, y0 = TILE_ORIGIN
    bounds = transform_bounds("EPSG:26917", "EPSG:5070", x0 - 2000, y0 - tile_size - 2000, x0 + tile_size + 2000,
                              y0 + 2000)
    win = from_bounds(*bounds, transform=NLCD_GRID["transform"]).round_offsets().round_lengths()
    rng = np.random.default_rng(0)
    patches = rng.choice(NLCD_CODES, size=(win.height // 8 + 1, win.width // 8 + 1))
    data = np.kron(patches, np.ones((8, 8), dtype=np.uint8))[: win.height, : win.width]
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1, window=win)
    return win.height, win.width


# Runs the tool in a fresh interpreter and prints its peak RSS last. Linux keeps ``ru_maxrss`` across
# fork + exec, so getrusage in (or of) a child also counts this parent's pages (torch, imported by
# the benchmark dispatcher); the child's own VmHWM does not, and getrusage is the fallback elsewhere.
_PEAK_WRAPPER = """
import resource, runpy, sys
tool, sys.argv = sys.argv[1], sys.argv[1:]
code = 0
try:
    runpy.run_path(tool, run_name=sys.argv.pop(1))
except SystemExit as exc:
    code = exc.code
try:
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
except OSError:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("PEAK_KIB", kib)
sys.exit(code)
"""


def _child_peak_kib(tool: str, run_name: str, args: list[str]) -> tuple[int, float, str]:
    """Run ``tool`` (as ``run_name``) with ``args`` in a child: (peak RSS KiB, wall seconds, stdout)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, tool, run_name, *args], cwd=REPO,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{tool} {' '.join(args)} failed:\n{done.stderr}")
    lines = done.stdout.strip().splitlines()
    return int(lines[-1].split()[1]), seconds, "\n".join(lines[:-1])


def run(args: argparse.Namespace) -> int:
    os.makedirs(args.work_dir, exist_ok=True)
    tile = os.path.join(args.work_dir, f"tile_{args.tile_size}.tif")
    lr = os.path.join(args.work_dir, "nlcd_conus_5070.tif")
    start = time.perf_counter()
    if not os.path.isfile(tile):
        _make_tile(tile, args.tile_size)
    if not os.path.isfile(lr):
        rows, cols = _make_lr(lr, args.tile_size)
        print(f"generated the LR raster ({cols} x {rows} pixels of data) in {time.perf_counter() - start:.1f} s")
    lr_px = NLCD_GRID["width"] * NLCD_GRID["height"]
    print(f"HR tile: {tile} ({args.tile_size} x {args.tile_size}, {os.path.getsize(tile) / 2**20:.1f} MiB on disk)")
    print(f"LR raster: {lr} ({NLCD_GRID['width']} x {NLCD_GRID['height']} = {lr_px / 1e9:.1f} G pixels, "
          f"{lr_px / 2**30:.1f} GiB as uint8 in memory; {os.path.getsize(lr) / 2**20:.1f} MiB on disk)")

    tool = os.path.join(REPO, "tools", "prepare_data.py")
    base_kib, _, _ = _child_peak_kib(tool, "imported_only", [])
    out_dir = os.path.join(args.work_dir, "out")
    cmd = ["align", "--lr", lr, "--images", tile, "--out_dir", out_dir, "--window", str(args.window),
           "--cache_mb", str(args.cache_mb), "--resampling", args.resampling]
    peak_kib, seconds, stdout = _child_peak_kib(tool, "__main__", cmd)
    print(stdout)
    print(f"command: python tools/prepare_data.py {' '.join(cmd)}")
    print(f"align: {seconds:.1f} s wall, peak RSS {peak_kib / 1024:.0f} MiB "
          f"(import-only child: {base_kib / 1024:.0f} MiB; align holds {(peak_kib - base_kib) / 1024:.0f} MiB more); "
          f"output tile {args.tile_size**2 / 2**20:.0f} MiB as uint8")
    return 0
