"""Up-front checks of a tile list, so that bad input fails before training (or mapping) starts.

:func:`check_entry` opens one list row and returns its problems as one-line messages that name the
file: missing or unreadable rasters, a band count that differs from the dataset definition, label
and image of different size (or, when both are georeferenced, on different grids), a truncated
image, and label codes that the dataset's lookup tables do not know (docs/design.md §10, defect 13).
It never raises for bad data; the caller decides what to do with the messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import rasterio
from rasterio.windows import Window

from dataset import DatasetDefinition, LabelTable, TileEntry
from dataset.errors import InputError
from dataset.raster_io import STRIP_ROWS, check_bands, check_same_grid, open_raster, read_strips, read_window


def label_histogram(src: rasterio.DatasetReader, strip_rows: int = STRIP_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of band 1 and their pixel counts, read in strips of ``strip_rows`` rows.

    Raises:
        InputError: naming the file when a strip cannot be decoded.
    """
    counts = np.zeros(256, dtype=np.int64) if src.dtypes[0] == "uint8" else None
    found: dict = {}
    for _, data in read_strips(src, strip_rows):
        if counts is not None:
            counts += np.bincount(data.ravel(), minlength=256)
        else:
            for value, n in zip(*np.unique(data, return_counts=True)):
                found[value.item()] = found.get(value.item(), 0) + int(n)
    if counts is not None:
        codes = np.flatnonzero(counts)
        return codes, counts[codes]
    codes = sorted(found)
    return np.array(codes), np.array([found[c] for c in codes], dtype=np.int64)


def label_codes(src: rasterio.DatasetReader, strip_rows: int = STRIP_ROWS) -> np.ndarray:
    """Distinct values of band 1, read in strips of ``strip_rows`` rows (bounded memory).

    Raises:
        InputError: naming the file when a strip cannot be decoded.
    """
    return label_histogram(src, strip_rows)[0]


def _check_codes(src: rasterio.DatasetReader, table: LabelTable) -> None:
    """Raise InputError (naming the file and the unknown codes) unless ``table`` knows every code."""
    table.map(label_codes(src), source=src.name)


def _check_label(image: rasterio.DatasetReader, path: str, what: str, table: LabelTable | None,
                 scan_codes: bool) -> None:
    with open_raster(path, what) as label:
        if label.count != 1:
            raise InputError(f"{path}: {what} has {label.count} bands, expected 1")
        georeferenced = image.crs is not None and label.crs is not None
        check_same_grid(image, label, check_georef=georeferenced)
        if scan_codes and table is not None:
            _check_codes(label, table)


def check_entry(entry: TileEntry, dataset: DatasetDefinition, *, scan_codes: bool = True,
                check_hr: bool = False) -> list[str]:
    """Check one list row against ``dataset``.

    Args:
        entry: the row (absolute paths).
        dataset: the definition (band count, LR and HR label tables).
        scan_codes: read the whole label raster(s) and check every code against the tables
            (one pass over the label, in strips); off, only headers and one image strip are read.
        check_hr: also check ``entry.hr_label`` (required then) against ``dataset.hr_label``.

    Returns:
        One-line problems, each naming the file; empty when the row is usable.
    """
    problems: list[str] = []
    try:
        image = open_raster(entry.image, "image")
    except InputError as exc:
        return [str(exc)]
    with image:
        labels = []
        if entry.label:
            labels.append((entry.label, "label", dataset.lr_label))
        if check_hr:
            if not entry.hr_label:
                problems.append(f"{entry.image}: no hr_label_fn given for this tile")
            else:
                labels.append((entry.hr_label, "HR reference", dataset.hr_label))
        try:
            check_bands(image, dataset.num_bands)
            # A truncated file opens fine and fails on its last strip.
            last = max(0, image.height - 1)
            read_window(image, Window(0, last, image.width, image.height - last))
        except InputError as exc:
            problems.append(str(exc))
        for path, what, table in labels:
            try:
                _check_label(image, path, what, table, scan_codes)
            except InputError as exc:
                problems.append(str(exc))
    return problems


def check_entries(entries: Iterable[TileEntry], dataset: DatasetDefinition, *, scan_codes: bool = True,
                  check_hr: bool = False, progress: Callable[[Iterable], Iterable] | None = None) -> list[str]:
    """:func:`check_entry` over a list; ``progress`` may wrap the iteration (e.g. ``tqdm``)."""
    rows = progress(entries) if progress else entries
    problems: list[str] = []
    for entry in rows:
        problems.extend(check_entry(entry, dataset, scan_codes=scan_codes, check_hr=check_hr))
    return problems


def raise_problems(problems: list[str], where: str) -> None:
    """Raise one InputError for ``problems`` (the first in full, then how many more), if any."""
    if problems:
        more = f" (and {len(problems) - 1} more problems in {where})" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)


#: Tiles and window side sampled by :func:`imagery_scale_warning`.
SCALE_TILES, SCALE_WINDOW = 8, 256
#: A band is "far" from the normalisation when its sampled mean is this many of the definition's
#: std away from the definition's mean, or its sampled std is off by this factor.
FAR_MEAN, FAR_STD_FACTOR = 4.0, 10.0


def imagery_scale_warning(images: Sequence[str], dataset: DatasetDefinition) -> str | None:
    """A warning when the imagery's values do not look like those the dataset's mean/std describe.

    Central windows of up to :data:`SCALE_TILES` tiles (spread over the list) are sampled; when
    every band is far from the definition (0-1 floats given to 0-255 statistics, 16-bit values
    given to 8-bit ones), the network would see nonsense without any error. Returns None otherwise.
    """
    if not images:
        return None
    picks = sorted({round(i * (len(images) - 1) / max(SCALE_TILES - 1, 1)) for i in range(SCALE_TILES)})
    samples = []
    for index in picks:
        with open_raster(images[index], "image") as src:
            if src.count != dataset.num_bands:
                return None  # the band check reports this one
            w, h = min(SCALE_WINDOW, src.width), min(SCALE_WINDOW, src.height)
            window = Window((src.width - w) // 2, (src.height - h) // 2, w, h)
            data = read_window(src, window).reshape(src.count, -1).astype(np.float64)
        samples.append(data[:, np.any(data != 0, axis=0)])  # all-zero pixels are no data
    pixels = np.concatenate(samples, axis=1)
    if pixels.shape[1] == 0:
        return None
    mean, std = pixels.mean(axis=1), pixels.std(axis=1)
    ref_mean, ref_std = np.asarray(dataset.mean, dtype=np.float64), np.asarray(dataset.std, dtype=np.float64)
    far_mean = np.abs(mean - ref_mean) > FAR_MEAN * ref_std
    far_std = (std * FAR_STD_FACTOR < ref_std) | (std > FAR_STD_FACTOR * ref_std)
    if not np.all(far_mean | far_std):
        return None
    return (f"warning: {images[picks[0]]}: the imagery's sampled values (band means "
            f"{', '.join(f'{v:.3g}' for v in mean)}; stds {', '.join(f'{v:.3g}' for v in std)}) are far from "
            f"the normalisation of dataset {dataset.name!r} (means {', '.join(f'{v:g}' for v in ref_mean)}; stds "
            f"{', '.join(f'{v:g}' for v in ref_std)}): is it scaled differently (e.g. 0-1 floats for 0-255 "
            "statistics)? Rescale it, or give a definition with its own statistics (tools/prepare_data.py stats)")
