"""Windowed GeoTIFF reading, the project's GeoTIFF output profile, and one-line errors that name the file."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from dataset.errors import InputError
from dataset.files import atomic_output, write_failure_cause

#: Internal block side of every GeoTIFF the project writes (class maps, probabilities, aligned labels).
GEOTIFF_BLOCK = 256


def open_raster(path: str, what: str = "raster") -> rasterio.DatasetReader:
    """Open a raster for reading.

    Raises:
        InputError: ``"<path>: <what> not found"`` or ``"<path>: cannot open <what> (...)"``.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: {what} not found")
    try:
        with warnings.catch_warnings():
            # Plain (non-georeferenced) patches are legitimate inputs, e.g. the bundled sample.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except (RasterioIOError, OSError) as exc:
        raise InputError(f"{path}: cannot open {what} ({str(exc).splitlines()[0]})") from None


def read_window(src: rasterio.DatasetReader, window: Window | None = None, bands: Sequence[int] | None = None,
                boundless: bool = False, fill_value: float = 0) -> np.ndarray:
    """Read ``window`` (all bands unless ``bands``) as ``(C, h, w)`` in the file's dtype.

    ``fill_value`` applies to boundless reads only: given to rasterio on an ordinary read, it also
    fills masked pixels, and a NAIP file whose NIR band is tagged as alpha would get every pixel
    with NIR 0 zeroed in all bands.

    Raises:
        InputError: naming the file when the data cannot be decoded (corrupt GeoTIFF).
    """
    extra = {"boundless": True, "fill_value": fill_value} if boundless else {}
    try:
        return src.read(indexes=list(bands) if bands else None, window=window, **extra)
    except (RasterioIOError, OSError, ValueError) as exc:
        raise InputError(f"{src.name}: cannot read pixels ({str(exc).splitlines()[0]})") from None


#: Rows per windowed read when scanning a whole band (bounded memory on large tiles).
STRIP_ROWS = 1024


def read_strips(src: rasterio.DatasetReader, strip_rows: int = STRIP_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """Band 1 of ``src`` in strips of ``strip_rows`` full-width rows: ``(first row, (rows, width) array)``.

    Raises:
        InputError: naming the file when a strip cannot be decoded.
    """
    for top in range(0, src.height, strip_rows):
        yield top, read_window(src, Window(0, top, src.width, min(strip_rows, src.height - top)), bands=[1])[0]


def no_image(data: np.ndarray, value: float) -> np.ndarray:
    """``(h, w)`` bool: the pixels of ``data`` ``(bands, h, w)`` (or ``(bands, n)``) whose every band holds
    ``value`` (NaN matches NaN), which have no image when ``value`` is the raster's no-data value."""
    return np.isnan(data).all(axis=0) if np.isnan(value) else (data == value).all(axis=0)


def blank_pixels(data: np.ndarray, declared: float | None) -> np.ndarray:
    """The pixels that training and the band statistics leave out: every band 0 (the published rule) or, in an
    image that declares a no-data value, every band at it (see :func:`no_image`)."""
    blank = no_image(data, 0)
    if declared is not None and declared != 0:
        blank |= no_image(data, declared)
    return blank


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Per-band ``(x - mean) / std`` computed in float64 and cast to float32 (docs/design.md §2).

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` array of raw pixel values.
    """
    mean_arr = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
    std_arr = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
    out = image.astype(np.float64)  # in place from here: one float64 temporary, not three
    out -= mean_arr
    out /= std_arr
    return out.astype(np.float32)


def check_bands(src: rasterio.DatasetReader, expected: int, what: str = "image") -> None:
    """Raise InputError unless ``src`` has exactly ``expected`` bands."""
    if src.count != expected:
        raise InputError(f"{src.name}: {what} has {src.count} bands, the dataset definition expects {expected}")


def check_same_grid(a: rasterio.DatasetReader, b: rasterio.DatasetReader, check_georef: bool = True) -> None:
    """Raise InputError unless ``a`` and ``b`` have the same size (and CRS and transform)."""
    if (a.height, a.width) != (b.height, b.width):
        raise InputError(
            f"{b.name}: size {b.width}x{b.height} differs from {a.name} ({a.width}x{a.height})"
        )
    if check_georef:
        if a.crs != b.crs:
            raise InputError(f"{b.name}: CRS {b.crs} differs from {a.name} ({a.crs})")
        if not a.transform.almost_equals(b.transform):
            raise InputError(f"{b.name}: transform {tuple(b.transform)[:6]} differs from {a.name}")


def geotiff_profile(*, width: int, height: int, count: int, crs, transform, nodata: int | None) -> dict:
    """Profile of the uint8 rasters the project writes: tiled, deflate-compressed, BigTIFF when needed."""
    return {
        "driver": "GTiff", "width": width, "height": height, "count": count, "dtype": "uint8", "crs": crs,
        "transform": transform, "nodata": nodata, "tiled": True, "blockxsize": GEOTIFF_BLOCK,
        "blockysize": GEOTIFF_BLOCK, "compress": "deflate", "BIGTIFF": "IF_SAFER",
    }


def raster_problem(path: str) -> str | None:
    """Why the raster at ``path`` is not complete (cannot be opened or a block cannot be read), or None.

    Every block of every band is decoded, so a file that a failed write left short is found.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                for _, window in src.block_windows(1):
                    src.read(window=window)
    except (RasterioIOError, OSError, ValueError) as exc:
        return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


@contextlib.contextmanager
def written_raster(path: str, what: str = "raster") -> Iterator[str]:
    """:func:`dataset.files.atomic_output` for a raster: the temporary file is reopened and fully read
    after the block (which must close the dataset) and renamed only if that succeeds.

    GDAL reports some write failures (a full disk while the block cache is flushed at close) only
    on stderr; this is what keeps such a file from appearing under its final name.

    Raises:
        InputError: naming ``path`` and the cause when the written file is incomplete.
    """
    with atomic_output(path) as tmp:
        yield tmp
        problem = raster_problem(tmp)
        if problem is not None:
            problem = problem.replace(os.path.basename(tmp), os.path.basename(path))
            cause = write_failure_cause(tmp, f"the written file cannot be read back: {problem}")
            raise InputError(f"{path}: the {what} could not be completely written ({cause}); nothing was saved "
                             "under this name")
