"""Put a low-resolution (LR) land-cover product onto the exact grid of high-resolution image tiles.

The LR label of a tile must have the tile's size (docs/design.md §6.1); here it also gets the tile's
CRS and transform, so label and image agree pixel for pixel. For every tile the output
``<stem>_lr.tif`` is uint8, nodata 0, tiled and compressed, and is made one output window at a time:

1. the window's footprint is transformed to each LR raster's CRS (densified edges) and widened by a
   margin of :data:`MARGIN` source pixels;
2. only that part of the LR raster is read, its nodata value marked, and it is warped onto the
   window with nearest neighbour (or mode) resampling (``rasterio.warp.reproject``);
3. several LR rasters (a list, a glob, or the tiles of a product) fill the window in the order
   given, each only where the window is still empty; a VRT mosaic is read like any raster;
4. codes are copied (they must fit in uint8) or mapped through a dataset's ``lr_label`` table.

Memory is bounded by the output window and the LR window that covers it, never by the size of the
tile or of the product (``python tools/benchmark.py align`` measures it).

Code 0 is reserved for "no data" in the output: pixels outside every LR raster, pixels holding the
LR raster's own nodata value, and (with a class table) codes that the table maps to 0.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import CRSError, RasterioError
from rasterio.transform import array_bounds
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds
from rasterio.windows import transform as window_transform

from dataset import LabelTable
from dataset.errors import InputError
from dataset.files import check_output_folder, locked_in_turn, remove_stale_temporaries
from dataset.raster_io import geotiff_profile, open_raster, raster_problem, read_window, written_raster

#: Side of the output windows (pixels); a multiple of the output block size.
WINDOW = 1024
#: Extra LR pixels read around each window, so edge pixels have their nearest / mode neighbours.
MARGIN = 2
#: Working code of an LR pixel that holds the LR raster's nodata value.
NODATA_CODE = -1
#: Working code of an output pixel that no LR raster covers.
OUTSIDE = np.iinfo(np.int32).min
#: Suffix of the aligned label next to the tile's stem.
SUFFIX = "_lr.tif"

RESAMPLING = {"nearest": Resampling.nearest, "mode": Resampling.mode}


@dataclass(frozen=True)
class AlignReport:
    """What one aligned tile looks like.

    Attributes:
        image: the HR tile.
        output: the written label raster.
        pixels: tile pixels.
        covered: share of the pixels inside at least one LR raster.
        nodata: share of the pixels written as 0 (outside, LR nodata, or mapped to no data).
    """

    image: str
    output: str
    pixels: int
    covered: float
    nodata: float

    def line(self) -> str:
        return (f"{self.output}: {100 * self.covered:.1f}% of the tile covered by the LR product, "
                f"{100 * self.nodata:.1f}% nodata")


def expand_lr_paths(paths: Sequence[str]) -> list[str]:
    """LR rasters from paths, glob patterns and ``.txt`` files that list one path a line.

    Raises:
        InputError: a pattern that matches nothing, or an empty result.
    """
    found: list[str] = []
    for path in paths:
        if glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise InputError(f"{path}: no LR raster matches this pattern")
            found.extend(matches)
        elif path.lower().endswith((".txt", ".lst")):
            folder = os.path.dirname(os.path.abspath(path))
            try:
                with open(path, encoding="utf-8") as fh:
                    lines = [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
            except OSError as exc:
                raise InputError(f"{path}: cannot read the list of LR rasters ({exc})") from None
            found.extend(ln if os.path.isabs(ln) else os.path.join(folder, ln) for ln in lines)
        else:
            found.append(path)
    if not found:
        raise InputError("no LR raster given")
    return found


def grid_windows(width: int, height: int, size: int = WINDOW) -> Iterator[Window]:
    """Row-major windows of at most ``size`` x ``size`` pixels covering a ``width`` x ``height`` grid."""
    for row in range(0, height, size):
        for col in range(0, width, size):
            yield Window(col, row, min(size, width - col), min(size, height - row))


def _source_window(src: _Header, crs, bounds: tuple[float, float, float, float]) -> Window | None:
    """The part of ``src`` (plus :data:`MARGIN`) under ``bounds`` given in ``crs``; None if none."""
    try:
        left, bottom, right, top = transform_bounds(crs, src.crs, *bounds, densify_pts=21)
    except (CRSError, RasterioError, ValueError):
        return None  # the footprint cannot be expressed in the LR CRS (outside its domain)
    if not all(math.isfinite(v) for v in (left, bottom, right, top)):
        return None
    win = from_bounds(left, bottom, right, top, transform=src.transform)
    col0 = max(0, math.floor(win.col_off) - MARGIN)
    row0 = max(0, math.floor(win.row_off) - MARGIN)
    col1 = min(src.width, math.ceil(win.col_off + win.width) + MARGIN)
    row1 = min(src.height, math.ceil(win.row_off + win.height) + MARGIN)
    if col1 <= col0 or row1 <= row0:
        return None
    return Window(col0, row0, col1 - col0, row1 - row0)


def _as_codes(raw: np.ndarray, nodata: float | None, name: str) -> np.ndarray:
    """LR values as int32 codes, with the raster's nodata value as :data:`NODATA_CODE`.

    Raises:
        InputError: negative, fractional or oversized codes (naming the LR raster).
    """
    missing = np.zeros(raw.shape, dtype=bool)
    if raw.dtype.kind == "f":
        missing |= ~np.isfinite(raw)
    if nodata is not None and not math.isnan(nodata):
        missing |= raw == nodata
    values = raw[~missing]
    if values.size:
        lo, hi = values.min(), values.max()
        if lo < 0 or hi > np.iinfo(np.int32).max:
            raise InputError(f"{name}: LR value {lo if lo < 0 else hi} is not a land-cover class code")
        if raw.dtype.kind == "f" and not np.all(values == np.floor(values)):
            raise InputError(f"{name}: LR values must be whole class codes (found fractions)")
    codes = np.where(missing, 0, raw).astype(np.int32)
    codes[missing] = NODATA_CODE
    return codes


@dataclass(frozen=True)
class _Header:
    """What the footprint test needs from an LR raster, kept without an open file handle."""

    crs: object
    transform: object
    width: int
    height: int
    nodata: float | None


class LRProduct:
    """One LR product made of one or more rasters (first raster wins where they overlap).

    Every raster's header is read up front; pixels are read through at most :attr:`max_open`
    open handles (least recently used closed first), so a product of thousands of tiles works.

    Raises:
        InputError: a raster that cannot be opened, has no CRS, or lacks ``band``.
    """

    max_open = 32

    def __init__(self, paths: Sequence[str], band: int = 1):
        self.paths = expand_lr_paths(paths)
        self.band = band
        self._open: OrderedDict[str, rasterio.DatasetReader] = OrderedDict()
        self._headers: dict[str, _Header] = {}
        for path in self.paths:
            with open_raster(path, "LR product") as src:
                if src.crs is None:
                    raise InputError(f"{path}: the LR product has no CRS; assign one (e.g. gdal_edit.py -a_srs) first")
                if not 1 <= band <= src.count:
                    raise InputError(f"{path}: the LR product has {src.count} band(s), band {band} was asked for")
                self._headers[path] = _Header(src.crs, src.transform, src.width, src.height, src.nodata)

    @property
    def name(self) -> str:
        more = f" (+{len(self.paths) - 1} more)" if len(self.paths) > 1 else ""
        return self.paths[0] + more

    def _get(self, path: str) -> rasterio.DatasetReader:
        if path in self._open:
            self._open.move_to_end(path)
        else:
            if len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
            self._open[path] = open_raster(path, "LR product")
        return self._open[path]

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open.clear()

    def __enter__(self) -> LRProduct:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def overlapping(self, crs, bounds: tuple[float, float, float, float]) -> list[str]:
        """The rasters whose extent meets ``bounds`` (given in ``crs``)."""
        return [p for p in self.paths if _source_window(self._headers[p], crs, bounds) is not None]

    def read_onto(self, crs, transform, shape: tuple[int, int], resampling: Resampling = Resampling.nearest,
                  candidates: Sequence[str] | None = None) -> np.ndarray:
        """Warp the product onto a grid.

        Args:
            crs, transform, shape: the destination grid (``shape`` = (rows, cols)).
            resampling: nearest or mode.
            candidates: rasters to consider (default: all).

        Returns:
            int32 ``shape`` array of LR codes; :data:`NODATA_CODE` where the LR raster holds its
            nodata value, :data:`OUTSIDE` where no raster covers the pixel.
        """
        out = np.full(shape, OUTSIDE, dtype=np.int32)
        bounds = array_bounds(shape[0], shape[1], transform)
        for path in self.paths if candidates is None else candidates:
            header = self._headers[path]
            src_win = _source_window(header, crs, bounds)
            if src_win is None:
                continue
            raw = read_window(self._get(path), src_win, bands=[self.band])[0]
            piece = np.full(shape, OUTSIDE, dtype=np.int32)
            reproject(_as_codes(raw, header.nodata, path), piece,
                      src_transform=window_transform(src_win, header.transform),
                      src_crs=header.crs, dst_transform=transform, dst_crs=crs, dst_nodata=OUTSIDE,
                      resampling=resampling, tolerance=0)  # exact per-pixel transform: window-independent
            # Fill what is still uncovered; replace LR nodata only with real codes.
            take = (piece != OUTSIDE) & ((out == OUTSIDE) | ((out == NODATA_CODE) & (piece != NODATA_CODE)))
            out[take] = piece[take]
            if not np.any(out == OUTSIDE) and not np.any(out == NODATA_CODE):
                break
        return out


def codes_to_labels(codes: np.ndarray, table: LabelTable | None, source: str) -> np.ndarray:
    """Working codes (see :meth:`LRProduct.read_onto`) to the uint8 label, 0 = no data.

    Raises:
        InputError: (with ``table``) codes the table does not know; (without) codes above 255.
    """
    valid = codes >= 0
    labels = np.zeros(codes.shape, dtype=np.uint8)
    if not np.any(valid):
        return labels
    if table is not None:
        labels[valid] = table.map(codes[valid], source=source)
        return labels
    top = int(codes[valid].max())
    if top > 255:
        raise InputError(f"{source}: LR code {top} does not fit in uint8; map the codes with --class_map")
    labels[valid] = codes[valid]
    return labels


def output_path(image: str, out_dir: str) -> str:
    """``<out_dir>/<image stem>_lr.tif``."""
    return os.path.join(out_dir, os.path.splitext(os.path.basename(image))[0] + SUFFIX)


def tile_grid(image: str, product: LRProduct) -> tuple[tuple, list[str]]:
    """((crs, transform, width, height), overlapping LR rasters) of an HR tile.

    Raises:
        InputError: the tile cannot be opened, has no CRS, or does not overlap the product.
    """
    with open_raster(image, "image") as src:
        if src.crs is None:
            raise InputError(f"{image}: the image has no CRS; the LR product cannot be placed on it")
        grid = (src.crs, src.transform, src.width, src.height)
    candidates = product.overlapping(grid[0], array_bounds(grid[3], grid[2], grid[1]))
    if not candidates:
        raise InputError(f"{image}: the tile does not overlap the LR product {product.name}")
    return grid, candidates


def align_tile(image: str, product: LRProduct, out_path: str, *, table: LabelTable | None = None,
               resampling: Resampling = Resampling.nearest, window: int = WINDOW,
               colormap: dict | None = None) -> AlignReport:
    """Write the LR product on ``image``'s grid to ``out_path`` (atomically), window by window.

    Args:
        image: the HR tile (only its grid is read).
        product: the LR rasters.
        out_path: the label raster to write (uint8, nodata 0, tiled, deflate).
        table: optional raw code -> class index table (a dataset's ``lr_label``).
        resampling: ``Resampling.nearest`` or ``Resampling.mode``.
        window: output window side in pixels (memory is about 20 bytes per window pixel plus the
            LR window under it: some 20 MiB at 1024).
        colormap: optional palette for band 1.

    Raises:
        InputError: tile without CRS, no overlap with the product, or codes that do not fit.
    """
    (crs, transform, width, height), candidates = tile_grid(image, product)
    profile = geotiff_profile(width=width, height=height, count=1, crs=crs, transform=transform, nodata=0)
    covered = nodata = 0
    source = f"{product.name} on {image}"
    with written_raster(out_path, "label") as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for win in grid_windows(width, height, window):
            codes = product.read_onto(crs, window_transform(win, transform), (win.height, win.width),
                                      resampling, candidates)
            labels = codes_to_labels(codes, table, source)
            covered += int(np.count_nonzero(codes != OUTSIDE))
            nodata += int(np.count_nonzero(labels == 0))
            dst.write(labels, 1, window=win)
        if colormap:
            dst.write_colormap(1, colormap)
        dst.set_band_description(1, "LR label")
        dst.update_tags(LR_PRODUCT=product.name, SOURCE_IMAGE=os.path.basename(image))
    pixels = width * height
    return AlignReport(image, out_path, pixels, covered / pixels, nodata / pixels)


def align_tiles(images: Sequence[str], lr_paths: Sequence[str], out_dir: str, *, table: LabelTable | None = None,
                resampling: str = "nearest", window: int = WINDOW, band: int = 1, colormap: dict | None = None,
                skip_existing: bool = False, report: Callable[[AlignReport], None] | None = None,
                log: Callable[[str], None] = print) -> list[AlignReport]:
    """Align the LR product onto every tile of ``images``, writing ``<out_dir>/<stem>_lr.tif``.

    Every tile is checked first (CRS, overlap, unique output name) and the output folder must be
    writable, so a bad tile stops the run before anything is written. With ``skip_existing`` a
    label is kept only if it is complete (every block reads back); others are aligned again.

    Raises:
        InputError: the first bad tile or LR raster, in one line that names it.
    """
    if resampling not in RESAMPLING:
        raise InputError(f"resampling {resampling!r}: choose one of {sorted(RESAMPLING)}")
    if not images:
        raise InputError("no image tile given")
    outputs = [output_path(image, out_dir) for image in images]
    seen: dict[str, str] = {}
    for image, out in zip(images, outputs):
        if out in seen:
            raise InputError(f"{image}: same output name {os.path.basename(out)} as {seen[out]}")
        seen[out] = image
    if window < 1:
        raise InputError(f"--window {window}: must be at least 1")
    check_output_folder(out_dir, "--out_dir")
    reports = []
    with LRProduct(lr_paths, band=band) as product:
        for image in images:
            tile_grid(image, product)
        # Each label under its lock, so that a second align into the folder never removes this one's
        # label in progress as a stale temporary (dataset.files.locked_in_turn).
        turns = locked_in_turn(out_dir, list(zip(images, outputs)), lambda item: item[1],
                               lambda out: log(f"waiting for {out}: another process is aligning it"))
        with contextlib.closing(turns):
            for image, out in turns:
                remove_stale_temporaries([out])
                if skip_existing and os.path.isfile(out):
                    problem = raster_problem(out)
                    if problem is None:
                        continue
                    log(f"aligning {out} again: the existing label is incomplete ({problem})")
                result = align_tile(image, product, out, table=table, resampling=RESAMPLING[resampling],
                                    window=window, colormap=colormap)
                if report:
                    report(result)
                reports.append(result)
    return reports
