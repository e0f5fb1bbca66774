"""Tile lists for a new area: pair images with labels by file-name patterns, split, write CSVs.

:func:`build_rows` pairs image tiles with their labels through filename patterns;
:func:`random_split` and :func:`spatial_split` divide them into train and val lists;
:func:`write_list` writes ``image_fn,label_fn[,hr_label_fn]`` CSVs.
"""

from __future__ import annotations

import csv
import math
import os
import string
from collections.abc import Sequence

import numpy as np
from rasterio.errors import CRSError
from rasterio.transform import array_bounds
from rasterio.warp import transform_bounds

from dataset import TileEntry
from dataset.errors import InputError
from dataset.files import atomic_output
from dataset.raster_io import open_raster

COLUMNS = ("image_fn", "label_fn", "hr_label_fn")
PLACEHOLDERS = ("stem", "name", "dir", "key")


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
