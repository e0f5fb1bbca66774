"""A tile list checked before a long run: :func:`check_list` runs :func:`dataset.checks.check_entry`
over the list and adds what a run should know before it starts (dtypes, georeferencing, nodata
share per tile).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dataset import DatasetDefinition, LabelTable, TileEntry
from dataset.checks import check_entry, label_histogram
from dataset.errors import InputError
from dataset.raster_io import open_raster


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
    unknown label codes (:func:`dataset.checks.check_entry`), a non-numeric image dtype.
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
