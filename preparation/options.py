"""Settings of the four ``tools/prepare_data.py`` subcommands, each declared once."""

from __future__ import annotations

import dataclasses

from dataset.errors import InputError
from dataset.options import (
    ListOptions,
    Options,
    TileListOptions,
    at_least,
    between,
    fraction,
    option,
    override,
    positive_number,
    seed_range,
)
from preparation.align import RESAMPLING, WINDOW


@dataclasses.dataclass(kw_only=True)
class TileSourceOptions(ListOptions):
    """Tiles from a list's image_fn column or from a glob pattern."""

    list_dir: str | None = override(None, none_means="none: give --images")
    list_root: str | None = override(None, none_means="csv")
    images: str | None = option(None, "take the tiles from a (quoted) glob pattern instead of a list", group="data",
                                metavar="GLOB")

    def check(self) -> None:
        super().check()
        if bool(self.list_dir) == bool(self.images):
            raise InputError("give the tiles with one of --list_dir CSV or --images GLOB")


@dataclasses.dataclass(kw_only=True)
class AlignOptions(TileSourceOptions):
    """``align``: reproject an LR land-cover product onto each HR tile's grid."""

    lr: list[str] = option(required=True, metavar="PATH", group="LR product",
                           help="LR raster(s): files, a VRT, quoted glob patterns, or a .txt file listing one path a "
                                "line; where they overlap, the first given wins")
    out_dir: str = option(required=True, help="folder for the <tile stem>_lr.tif labels", group="output")
    class_map: str | None = option(None, "map raw codes to class indices with this dataset definition's lr_label "
                                         "table (a name such as OpenEarthMap_ESA_WorldCover, or a JSON path)",
                                   metavar="NAME", group="LR product", none_means="copy raw codes")
    resampling: str = option("nearest", "nearest, or mode (majority; for tiles coarser than the LR product)",
                             choices=tuple(sorted(RESAMPLING)), group="LR product")
    band: int = option(1, "band of the LR product to use", group="LR product", check=at_least(1))
    window: int = option(WINDOW, "output window side in pixels (memory bound)", group="output",
                         check=between(1, 1 << 16))
    cache_mb: int = option(256, "GDAL block cache in MiB", group="output", check=between(1, 1 << 20))
    skip_existing: bool = option(False, "keep labels that are already in --out_dir", group="output")


@dataclasses.dataclass(kw_only=True)
class ListWriteOptions(Options):
    """``list``: write a tile list CSV (image_fn,label_fn[,hr_label_fn]), optionally split."""

    images: str = option(required=True, metavar="GLOB", help="image tiles (a quoted glob pattern)", group="data")
    labels: str = option(required=True, metavar="PATTERN", group="data",
                         help="label path per image, with {stem}, {name}, {dir} or {key}, e.g. 'labels/{stem}_lr.tif'")
    hr_labels: str | None = option(None, "HR reference path per image (same placeholders)", metavar="PATTERN",
                                   group="data")
    strip: str = option("", "{key} is the image stem without this suffix (e.g. _naip-new)", metavar="SUFFIX",
                        group="data")
    skip_missing: bool = option(False, "leave out images whose label is missing", group="data")
    out: str = option(required=True, metavar="CSV", group="output",
                      help="the list to write (with a split also <out>_train.csv and <out>_val.csv)")
    absolute: bool = option(False, "write absolute paths (default: relative to the CSV)", group="output")
    split: str = option("none", "random: seeded draw of tiles; spatial: whole blocks of tiles by their centre, "
                                "train tiles touching val tiles dropped", choices=("none", "random", "spatial"),
                        group="split")
    val_fraction: float = option(0.2, "share of tiles for val", group="split", check=fraction)
    seed: int = option(0, "split seed", group="split", check=seed_range)
    block_size: float | None = option(None, "spatial block side in CRS units", group="split",
                                      check=positive_number, none_means="4 x the median tile side")

    def check(self) -> None:
        super().check()
        if self.split != "none" and not 0 < self.val_fraction < 1:
            raise InputError(f"--val_fraction {self.val_fraction}: a split needs a share strictly between 0 and 1")


@dataclasses.dataclass(kw_only=True)
class StatsOptions(TileSourceOptions):
    """``stats``: per-band mean and std of the listed images (sampled windows)."""

    out: str | None = option(None, "definition JSON to write the mean/std into", metavar="FILE", group="output")
    base: str | None = option(None, "start --out from this definition (name or JSON path)", metavar="NAME",
                              group="output")
    name: str | None = option(None, "dataset name in --out", group="output",
                              none_means="its file stem when --base is given")
    windows: int = option(16, "random windows per tile", group="sampling", check=between(1, 100_000))
    size: int = option(256, "window side in pixels", group="sampling", check=between(1, 1 << 16))
    seed: int = option(0, "sampling seed", group="sampling", check=seed_range)

    def check(self) -> None:
        super().check()
        if (self.base or self.name) and not self.out:
            raise InputError("--base and --name need --out FILE (the definition to write)")


@dataclasses.dataclass(kw_only=True)
class CheckOptions(TileListOptions):
    """``check``: validate a list against a dataset definition before a long run."""

    dataset: str | None = override(None, none_means="required")
    hr: bool = option(False, "also check the hr_label_fn column against the HR table", group="checks")
    max_nodata: float = option(0.5, "warn when a label has this share of no data", group="checks", check=fraction)
    chip_size: int = option(224, "training chip size (warn on smaller tiles)", group="checks", check=at_least(1))
    verbose: bool = option(False, "print the label nodata share of every tile", group="checks")

    def check(self) -> None:
        super().check()
        if not self.dataset:
            raise InputError("--dataset is required: a definition name or JSON path")
