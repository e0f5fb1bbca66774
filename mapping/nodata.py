"""The image's no-data pixels become the map's nodata (0), not a class the model guessed.

A tile declares its no-data value in its metadata (GDAL's nodata: the fill beyond a reprojected or clipped
image's footprint, usually 0). A pixel whose every band holds that value has no image, so its map pixel is
written 0, the map's nodata, which viewers show as transparent and mosaics fill from the map below
(``--image_nodata``: ``auto`` uses the declared value; a number declares one for tiles that lack it; ``none``
maps every pixel, as the published code does). Only the output is masked: the chips around those pixels
still hold them (training chips never do: the published no-data rule, extended to the declared value).

GDAL's masks are not used: NAIP files often tag their fourth band, near infrared, as alpha, and every pixel
with NIR 0 (deep water) would then count as no data.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from dataset.raster_io import no_image

#: ``--image_nodata`` values that are not numbers.
AUTO, NONE = "auto", "none"


def check_image_nodata(text: str) -> str | None:
    """Why ``--image_nodata text`` is not valid (None when it is)."""
    if text in (AUTO, NONE):
        return None
    try:
        float(text)
    except ValueError:
        return f"give {AUTO}, {NONE} or a number (e.g. 0)"
    return None


def image_nodata_value(setting: str, declared: float | None) -> float | None:
    """The no-data value of a tile whose metadata declares ``declared`` (None: none) under ``--image_nodata
    setting``; None: every pixel is mapped."""
    if setting == AUTO:
        return declared
    return None if setting == NONE else float(setting)


class NodataRows:
    """Image rows read through :meth:`read_rows`, which also notes the rows' no-data pixels for the map.

    The mapping pipeline reads each image row once, in order, in its reading thread; the writing thread then
    asks, strip by strip and in order, which pixels of the finished rows to write as nodata (:meth:`blank`).
    A strip's rows have always been read by then (its chips were computed from them).
    """

    def __init__(self, read_rows: Callable[[int, int], np.ndarray], value: float):
        self._read, self.value = read_rows, value
        self._lock = threading.Lock()
        self._noted: list[tuple[int, int, np.ndarray | None]] = []  # (first row, end, no-data pixels or None)

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        data = self._read(r0, r1)
        missing = no_image(data, self.value)
        with self._lock:
            self._noted.append((r0, r1, missing if missing.any() else None))
        return data

    def _take(self, row: int, rows: int) -> np.ndarray | None:
        """The no-data pixels of rows ``[row, row + rows)`` (None if none), forgetting the rows above them."""
        end = row + rows
        with self._lock:
            parts = [(first, last, missing) for first, last, missing in self._noted
                     if missing is not None and first < end and last > row]
            self._noted = [noted for noted in self._noted if noted[1] > end]
        if not parts:
            return None
        blank = np.zeros((rows, parts[0][2].shape[1]), dtype=bool)
        for first, last, missing in parts:
            top, bottom = max(first, row), min(last, end)
            blank[top - row:bottom - row] = missing[top - first:bottom - first]
        return blank

    def blank(self, row: int, classes: np.ndarray, probs: np.ndarray | None) -> None:
        """Set the no-data pixels of the finished rows ``[row, row + h)`` to 0 in ``classes`` ``(h, w)`` and
        ``probs`` ``(C, h, w)``, in place."""
        missing = self._take(row, classes.shape[0])
        if missing is not None:
            classes[missing] = 0
            if probs is not None:
                probs[:, missing] = 0
