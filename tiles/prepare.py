"""Data preparation beyond alignment: tile lists and splits, band statistics, list checks.

* :func:`build_rows` pairs image tiles with their labels through filename patterns;
  :func:`random_split` and :func:`spatial_split` divide them into train and val lists;
  :func:`write_list` writes ``image_fn,label_fn[,hr_label_fn]`` CSVs.
* :func:`band_statistics` samples windows of the listed images (never a whole tile) and returns the
  per-band mean and std of valid pixels; :func:`write_statistics` puts them into a definition file.
* :func:`check_list` runs :func:`tiles.validate.check_entry` over a list and adds what a long run
  should know before it starts (dtypes, georeferencing, nodata share per tile).
"""

from __future__ import annotations

import csv
import json
import math
import os
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from rasterio.errors import CRSError
from rasterio.transform import array_bounds
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from dataset import DatasetDefinition, LabelTable, TileEntry, load_dataset
from tiles.errors import InputError
from tiles.raster_io import atomic_output, check_bands, open_raster, read_window
from tiles.validate import check_entry, label_histogram

COLUMNS = ("image_fn", "label_fn", "hr_label_fn")
PLACEHOLDERS = ("stem", "name", "dir", "key")


# ----------------------------------------------------------------------------------------------
# Lists


def _pattern_fields(pattern: str, what: str) -> None:
    """Raise InputError if ``pattern`` uses a placeholder other than :data:`PLACEHOLDERS`."""
    try:
        used = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as exc:
        raise InputError(f"{what} pattern {pattern!r}: {exc}") from None
    bad = [f for f in used if f not in PLACEHOLDERS]
    if bad:
        raise InputError(f"{what} pattern {pattern!r}: unknown placeholder {{{bad[0]}}}; use {list(PLACEHOLDERS)}")


def fill_pattern(pattern: str, image: str, strip: str = "") -> str:
    """The file that ``pattern`` names for ``image``.

    Placeholders: ``{stem}`` image file name without extension, ``{name}`` with it, ``{dir}`` the
    image's folder, ``{key}`` the stem without the suffix ``strip`` (``m_1_naip-new`` with
    ``strip="_naip-new"`` gives ``m_1``).
    """
    stem = os.path.splitext(os.path.basename(image))[0]
    key = stem[: len(stem) - len(strip)] if strip and stem.endswith(strip) else stem
    return pattern.format(stem=stem, name=os.path.basename(image), dir=os.path.dirname(image), key=key)


def build_rows(images: Sequence[str], labels: str, hr_labels: str | None = None, strip: str = "",
               skip_missing: bool = False) -> tuple[list[TileEntry], list[str]]:
    """Pair each image with the label (and HR reference) its pattern names.

    Returns:
        (rows, skipped images). Without ``skip_missing``, a missing file is an error.

    Raises:
        InputError: no image, a bad pattern, or (without ``skip_missing``) a missing label.
    """
    if not images:
        raise InputError("no image matches --images")
    _pattern_fields(labels, "--labels")
    if hr_labels:
        _pattern_fields(hr_labels, "--hr_labels")
    rows, skipped = [], []
    for image in images:
        label = fill_pattern(labels, image, strip)
        hr = fill_pattern(hr_labels, image, strip) if hr_labels else None
        missing = [p for p in (label, hr) if p and not os.path.isfile(p)]
        if missing:
            if not skip_missing:
                raise InputError(f"{missing[0]}: no such label for {image} (or pass --skip_missing)")
            skipped.append(image)
            continue
        rows.append(TileEntry(os.path.abspath(image), os.path.abspath(label), hr and os.path.abspath(hr)))
    if not rows:
        raise InputError("no image has all its label files")
    return rows, skipped


def write_list(path: str, rows: Sequence[TileEntry], absolute: bool = False) -> None:
    """Write a list CSV; relative paths (the default) are relative to the CSV's folder."""
    folder = os.path.dirname(os.path.abspath(path))
    with_hr = any(r.hr_label for r in rows)

    def rel(p: str | None) -> str:
        return "" if p is None else (p if absolute else os.path.relpath(p, folder))

    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS if with_hr else COLUMNS[:2])
        for r in rows:
            writer.writerow([rel(r.image), rel(r.label)] + ([rel(r.hr_label)] if with_hr else []))


def _val_count(n: int, fraction: float) -> int:
    if not 0 < fraction < 1:
        raise InputError(f"--val_fraction {fraction}: must be between 0 and 1")
    if n < 2:
        raise InputError(f"a split needs at least 2 tiles, the list has {n}")
    return min(n - 1, max(1, round(fraction * n)))


def random_split(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded random split of ``n`` tiles: (train indices, val indices), each sorted."""
    order = np.random.default_rng(seed).permutation(n)
    k = _val_count(n, fraction)
    return sorted(order[k:].tolist()), sorted(order[:k].tolist())


def tile_bounds(images: Sequence[str]) -> list[tuple[float, float, float, float]]:
    """Bounds of every tile in the CRS of the first one (so tiles of several UTM zones compare).

    Raises:
        InputError: a tile without CRS (a spatial split needs georeferencing).
    """
    bounds, crs0 = [], None
    for image in images:
        with open_raster(image, "image") as src:
            if src.crs is None:
                raise InputError(f"{image}: the image has no CRS; a spatial split needs georeferenced tiles "
                                 "(use --split random)")
            crs0 = crs0 or src.crs
            b = array_bounds(src.height, src.width, src.transform)
            try:
                bounds.append(tuple(transform_bounds(src.crs, crs0, *b, densify_pts=21)))
            except CRSError as exc:
                raise InputError(f"{image}: cannot compare its position with {images[0]} ({exc})") from None
    return bounds


def _touch(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Footprints overlap or share an edge."""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def spatial_split(bounds: Sequence[tuple[float, float, float, float]], fraction: float, seed: int = 0,
                  block: float | None = None) -> tuple[list[int], list[int], list[int]]:
    """Split tiles by blocks of ``block`` x ``block`` CRS units, keyed by the tile centre.

    Whole blocks, drawn in a seeded random order, go to val until it holds ``fraction`` of the
    tiles; the others are train. Train tiles whose footprint still touches a val tile (across a
    block edge) are dropped, so no train pixel borders a val pixel.

    Args:
        bounds: (left, bottom, right, top) per tile, all in one CRS.
        block: block side; default four times the median tile side.

    Returns:
        (train, val, dropped) index lists, each sorted.
    """
    n = len(bounds)
    k = _val_count(n, fraction)
    if block is None:
        block = 4 * float(np.median([max(b[2] - b[0], b[3] - b[1]) for b in bounds]))
    if not block > 0:
        raise InputError(f"--block_size {block}: must be > 0")
    keys = [(math.floor((b[0] + b[2]) / 2 / block), math.floor((b[1] + b[3]) / 2 / block)) for b in bounds]
    blocks = sorted(set(keys))
    val: list[int] = []
    for j in np.random.default_rng(seed).permutation(len(blocks)):
        if len(val) >= k:
            break
        members = [i for i, key in enumerate(keys) if key == blocks[j]]
        if len(val) + len(members) < n:
            val.extend(members)
    if not val:
        raise InputError(f"all {n} tiles fall in one block of {block:g} units; give a smaller --block_size")
    val_set = set(val)
    train, dropped = [], []
    for i in range(n):
        if i in val_set:
            continue
        (dropped if any(_touch(bounds[i], bounds[j]) for j in val) else train).append(i)
    if not train:
        raise InputError("every train tile touches a val tile; give a larger --block_size")
    return train, sorted(val), dropped


# ----------------------------------------------------------------------------------------------
# Band statistics


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
                valid = np.any(data != 0, axis=0)
                if src.nodata is not None:
                    valid &= np.any(data != src.nodata, axis=0)
                moments.add(data[:, valid])
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


# ----------------------------------------------------------------------------------------------
# Checks


@dataclass
class CheckResult:
    """Outcome of :func:`check_list`.

    Attributes:
        errors: problems that would make training fail, one line each, naming the file.
        warnings: problems worth knowing (training still runs).
        nodata: label nodata share per tile (image path -> share), for tiles whose label was read.
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    nodata: dict[str, float] = field(default_factory=dict)

    def summary(self, tiles: int) -> str:
        text = f"checked {tiles} tiles: {len(self.errors)} errors, {len(self.warnings)} warnings"
        if self.nodata:
            worst = max(self.nodata, key=self.nodata.get)
            mean = sum(self.nodata.values()) / len(self.nodata)
            text += (f"; label nodata {100 * mean:.1f}% on average, at most {100 * self.nodata[worst]:.1f}% "
                     f"({os.path.basename(worst)})")
        return text


def nodata_share(path: str, table: LabelTable) -> float:
    """Share of a label's pixels that ``table`` maps to 0 (no data or ignored), in one strip-wise pass.

    Raises:
        InputError: codes the table does not know (naming the label).
    """
    with open_raster(path, "label") as src:
        codes, counts = label_histogram(src)
    classes = table.map(codes, source=path)
    return float(counts[classes == 0].sum() / max(int(counts.sum()), 1))


def _extra_checks(entry: TileEntry, result: CheckResult, dtypes: dict[str, str], chip: int) -> None:
    """Dtype, georeferencing and size checks that :func:`check_entry` leaves out."""
    with open_raster(entry.image, "image") as img:
        dtype, crs, size = img.dtypes[0], img.crs, (img.width, img.height)
    if np.dtype(dtype).kind not in "uif":
        result.errors.append(f"{entry.image}: image dtype {dtype} is not a real number type")
    dtypes.setdefault(dtype, entry.image)
    if min(size) < chip:
        result.warnings.append(f"{entry.image}: {size[0]}x{size[1]} is smaller than a {chip} chip; training "
                               "skips it")
    if entry.label:
        with open_raster(entry.label, "label") as lab:
            label_dtype, label_crs = lab.dtypes[0], lab.crs
        if np.dtype(label_dtype).kind not in "ui":
            result.warnings.append(f"{entry.label}: label dtype {label_dtype} is not an integer type")
        if (crs is None) != (label_crs is None):
            which = entry.label if label_crs is None else entry.image
            result.warnings.append(f"{which}: has no CRS while its {'image' if label_crs is None else 'label'} "
                                   "has one; only the sizes can be compared")


def check_list(entries: Sequence[TileEntry], dataset: DatasetDefinition, *, check_hr: bool = False,
               max_nodata: float = 0.5, chip: int = 224,
               progress: Callable[[Iterable], Iterable] | None = None) -> CheckResult:
    """Check every row of a list before a long run.

    Errors (training would fail): files missing or unreadable, band count, image/label size or grid,
    unknown label codes (:func:`tiles.validate.check_entry`), a non-numeric image dtype.
    Warnings: label nodata share above ``max_nodata``, tiles smaller than ``chip``, integer-less
    label dtype, georeferencing on one side only, images of different dtypes in one list.
    """
    result = CheckResult()
    dtypes: dict[str, str] = {}
    for entry in progress(entries) if progress else entries:
        # Headers, bands and grids here; the code scans below also give the nodata shares.
        problems = check_entry(entry, dataset, scan_codes=False, check_hr=check_hr)
        result.errors.extend(problems)
        if problems:
            continue
        _extra_checks(entry, result, dtypes, chip)
        try:
            if check_hr and dataset.hr_label is not None:
                nodata_share(entry.hr_label, dataset.hr_label)
            if entry.label:
                share = result.nodata[entry.image] = nodata_share(entry.label, dataset.lr_label)
                if share >= max_nodata:
                    result.warnings.append(f"{entry.label}: {100 * share:.1f}% of the label is no data")
        except InputError as exc:
            result.errors.append(str(exc))
    if len(dtypes) > 1:
        kinds = ", ".join(f"{d} ({os.path.basename(p)})" for d, p in dtypes.items())
        result.warnings.append(f"the images have different dtypes: {kinds}; one mean/std cannot fit them all")
    return result
