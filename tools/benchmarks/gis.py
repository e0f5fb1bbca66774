"""Time of the GIS outputs: mode overviews of a large class map, and a VRT mosaic of thousands of maps.

Example::

    python tools/benchmark.py gis --map_size 10000 --grid 50 --work_dir /tmp/vcnet_gis_bench

Generates (in ``--work_dir``; nothing lands in the repository) one ``--map_size`` square class map
(8 x 8 pixel patches of random classes, the project's GeoTIFF profile) and times its overviews;
then a ``--grid`` x ``--grid`` layout of 100 x 100 maps every 80 pixels (20-pixel overlaps,
positions jittered by up to 3 pixels like projected quarter quads), and times the mosaic and one
full read of it. Reports the seconds, the file sizes, and the pixels inside the region that the
mosaic leaves empty (0 expected).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import rasterio
from rasterio.transform import from_origin

from dataset import load_dataset
from dataset.raster_io import geotiff_profile
from mapping.mosaic import find_maps, write_mosaic
from mapping.overviews import add_overviews


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work_dir", default="/tmp/vcnet_gis_bench", help="where the generated maps go")
    parser.add_argument("--map_size", type=int, default=10000, help="side of the large map, in pixels")
    parser.add_argument("--grid", type=int, default=50, help="the mosaic has grid x grid maps")


def _class_map(path: str, pixels: np.ndarray, left: float, top: float, dataset, overviews: bool = False) -> float:
    """Write a class map with the project's metadata; returns the seconds its overviews took."""
    profile = geotiff_profile(width=pixels.shape[1], height=pixels.shape[0], count=1, crs="EPSG:26917",
                              transform=from_origin(left, top, 1.0, 1.0), nodata=0)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels, 1)
        dst.write_colormap(1, dataset.colormap())
        dst.update_tags(CLASS_NAMES=json.dumps(list(dataset.class_names)))
        start = time.perf_counter()
        if overviews:
            add_overviews(dst)
        return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    dataset = load_dataset("sample")
    rng = np.random.default_rng(0)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    os.makedirs(os.path.join(args.work_dir, "maps"))
    side = args.map_size
    patches = rng.integers(1, dataset.num_classes, (side // 8 + 1, side // 8 + 1), dtype=np.uint8)
    pixels = np.kron(patches, np.ones((8, 8), dtype=np.uint8))[:side, :side]
    large = os.path.join(args.work_dir, "large.tif")
    with rasterio.Env(GDAL_CACHEMAX=64 << 20):
        seconds = _class_map(large, pixels, 0.0, float(side), dataset, overviews=True)
    with rasterio.open(large) as src:
        levels = src.overviews(1)
    plain = os.path.join(args.work_dir, "plain.tif")
    _class_map(plain, pixels, 0.0, float(side), dataset)
    print(f"overviews of a {side:,} x {side:,} map: levels {levels}, {seconds:.1f} s, file "
          f"{os.path.getsize(large) / 1e6:.1f} MB (without overviews {os.path.getsize(plain) / 1e6:.1f} MB)")
    del pixels
    for row in range(args.grid):
        for col in range(args.grid):
            left, top = col * 80 + rng.integers(-3, 4), -row * 80 + rng.integers(-3, 4)
            _class_map(os.path.join(args.work_dir, "maps", f"m_{row:03d}_{col:03d}_predictions.tif"),
                       np.full((100, 100), 1 + (row + col) % (dataset.num_classes - 1), dtype=np.uint8),
                       float(left), float(top), dataset)
    vrt = os.path.join(args.work_dir, "maps", "mosaic.vrt")
    start = time.perf_counter()
    summary = write_mosaic(find_maps(os.path.join(args.work_dir, "maps")), vrt)
    mosaic_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with rasterio.open(vrt) as src:
        region = src.read(1)
    read_seconds = time.perf_counter() - start
    inner = region[8:-8, 8:-8]  # the jitter leaves the outer few pixels partly uncovered
    print(f"mosaic of {summary.maps:,} maps ({summary.width:,} x {summary.height:,} pixels): written in "
          f"{mosaic_seconds:.1f} s ({os.path.getsize(vrt) / 1e6:.1f} MB), read in {read_seconds:.1f} s; "
          f"{int((inner == 0).sum())} empty pixels inside the region")
    return 0
