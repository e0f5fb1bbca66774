"""Internal overviews (reduced-resolution copies inside the GeoTIFF) for large class maps.

Without them a viewer zoomed out on a 10,000 x 10,000 map reads all 100 million pixels to draw
the screen; with them it reads the level that matches the zoom. Class maps are reduced by *mode*
(the most frequent class of each block): an average would invent classes, nearest neighbour
would keep one pixel in four and flicker on thin features.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rasterio is imported when overviews are built, so that test.py --help stays fast
    import rasterio

#: Maps whose longer side has at least this many pixels get internal overviews (``--overview_min_size``).
OVERVIEW_MIN_SIZE = 2048


def overview_factors(width: int, height: int, min_size: int = OVERVIEW_MIN_SIZE) -> list[int]:
    """Reduction factors 2, 4, 8, ... until the smallest level fits in one GeoTIFF block; none for
    maps whose longer side is under ``min_size`` (or when ``min_size`` is 0)."""
    from dataset.raster_io import GEOTIFF_BLOCK

    side = max(width, height)
    if min_size <= 0 or side < min_size:
        return []
    factors = [2]
    while math.ceil(side / factors[-1]) > GEOTIFF_BLOCK:
        factors.append(factors[-1] * 2)
    return factors


def add_overviews(dst: rasterio.io.DatasetWriter, min_size: int = OVERVIEW_MIN_SIZE) -> list[int]:
    """Build mode-resampled internal overviews in ``dst`` (open for writing, pixels written).

    Returns:
        The factors built (empty for a map under ``min_size``).
    """
    import rasterio
    from rasterio.enums import Resampling

    factors = overview_factors(dst.width, dst.height, min_size)
    if factors:
        # Mode resampling is most of the cost, and it comes after the last row is mapped, when the other
        # threads are done: GDAL computes it on every core (the levels are the same).
        with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"):
            dst.build_overviews(factors, Resampling.mode)
        # rasterio's convention for recording how the levels were made (``rio overview --ls``).
        dst.update_tags(ns="rio_overview", resampling=Resampling.mode.name)
    return factors
