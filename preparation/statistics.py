"""Per-band mean and std of a tile list, from sampled windows (never a whole tile).

:func:`band_statistics` samples windows of the listed images and returns the per-band moments of
valid pixels; :func:`write_statistics` puts them into a dataset definition file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from rasterio.windows import Window

from dataset import DatasetDefinition, load_dataset
from dataset.errors import InputError
from dataset.files import atomic_output
from dataset.raster_io import blank_pixels, check_bands, open_raster, read_window


@dataclass
class RunningMoments:
    """Per-band count, mean and sum of squared deviations, merged window by window (Chan et al.)."""

    bands: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.bands)
        self.m2 = np.zeros(self.bands)

    def add(self, pixels: np.ndarray) -> None:
        """Add ``(bands, n)`` pixel values."""
        n = pixels.shape[1]
        if n == 0:
            return
        values = pixels.astype(np.float64)
        mean = values.mean(axis=1)
        m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


def sample_windows(width: int, height: int, size: int, count: int, rng: np.random.Generator) -> list[Window]:
    """``count`` random ``size`` windows inside the tile (the whole tile, once, if it is not larger)."""
    w, h = min(size, width), min(size, height)
    if (w, h) == (width, height):
        return [Window(0, 0, width, height)]  # the whole tile, once
    cols = rng.integers(0, width - w + 1, count)
    rows = rng.integers(0, height - h + 1, count)
    return [Window(int(c), int(r), w, h) for c, r in zip(cols, rows)]


def band_statistics(images: Sequence[str], *, windows: int = 16, size: int = 256, seed: int = 0,
                    bands: int | None = None, progress: Callable[[Iterable], Iterable] | None = None
                    ) -> RunningMoments:
    """Per-band mean and std over sampled windows of ``images``, skipping all-zero (no data) pixels.

    Args:
        images: the tiles.
        windows, size: ``windows`` random ``size`` x ``size`` windows per tile.
        seed: the sampling seed.
        bands: expected band count (e.g. the definition's); default: the first tile's.

    Raises:
        InputError: a tile that cannot be read, a band count that differs, or no valid pixel.
    """
    rng = np.random.default_rng(seed)
    moments = None
    for image in progress(images) if progress else images:
        with open_raster(image, "image") as src:
            if bands is None:
                bands = src.count
            check_bands(src, bands)
            moments = moments or RunningMoments(bands)
            for win in sample_windows(src.width, src.height, size, windows, rng):
                data = read_window(src, win).reshape(bands, -1)
                moments.add(data[:, ~blank_pixels(data, src.nodata)])
    if moments is None or moments.count == 0:
        raise InputError("no valid (non-zero) pixel in the sampled windows")
    return moments


def statistics_target(out: str, base: str | None = None, name: str | None = None) -> tuple[dict, int]:
    """The definition data that :func:`write_statistics` will complete, and its band count.

    Checked before any pixel is read, so a bad target fails fast.

    With ``base`` (a definition name or path) it is a complete copy of that definition, named
    ``name`` (default: ``out``'s file stem). Without, ``out`` must exist; its keys (``extends``
    included) are kept and only ``mean``/``std`` (and ``name`` if given) change.

    Raises:
        InputError: no base and no existing ``out``, or an invalid definition.
    """
    if base:
        definition = load_dataset(base)
        data = definition.to_dict()
        data["name"] = name or os.path.splitext(os.path.basename(out))[0]
        return data, definition.num_bands
    if not os.path.isfile(out):
        raise InputError(f"{out}: no such definition; give --base NAME to start from an existing one")
    definition = load_dataset(os.path.abspath(out))  # a path, even when it looks like a shipped name
    with open(out, encoding="utf-8") as fh:
        data = json.load(fh)
    if name:
        data["name"] = name
    return data, definition.num_bands


def write_statistics(out: str, data: dict, mean: Sequence[float], std: Sequence[float]) -> DatasetDefinition:
    """Write ``data`` with ``mean``/``std`` to ``out`` (atomically) and return the loaded definition.

    Raises:
        InputError: the result is not a valid definition (nothing is written then).
    """
    data = dict(data, mean=[round(float(v), 4) for v in mean], std=[round(float(v), 4) for v in std])
    with atomic_output(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        try:
            # The temporary file sits beside ``out``, so a relative "extends" resolves alike.
            return load_dataset(tmp)
        except InputError as exc:
            raise InputError(str(exc).replace(tmp, out)) from None
