"""Write a VRT mosaic of every class map in a folder, so the whole mapped region opens as one layer.

Example (after ``test.py`` has mapped a region, in one run or in many shards)::

    python tools/mosaic.py --pred_dir runs/ny/maps            # -> runs/ny/maps/mosaic.vrt

The VRT refers to the maps by relative paths and keeps their grid, nodata, colour table and class
names. Where maps overlap, the seam is the midline between their centres, whatever the order of
the files (docs/mapping.md, "Mosaic"). The work is done by :mod:`mapping.mosaic`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.errors import run_cli  # noqa: E402
from dataset.options import parse_options  # noqa: E402
from mapping.options import MosaicOptions  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(MosaicOptions, argv, __doc__)
    from mapping.mosaic import MOSAIC_NAME, find_maps, write_mosaic

    out = options.out or os.path.join(options.pred_dir, MOSAIC_NAME)
    summary = write_mosaic(find_maps(options.pred_dir), out, crs=options.crs)
    maps = f"{summary.maps} map" + ("" if summary.maps == 1 else "s")
    print(f"{summary.path}: {maps}, {summary.width:,} x {summary.height:,} pixels, {summary.crs}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
