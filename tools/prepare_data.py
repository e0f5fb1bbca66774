"""Prepare your own data for train.py: align LR labels to HR tiles, write lists, band statistics, checks.

One step per subcommand (docs/prepare_data.md walks through a new area end to end):

    python tools/prepare_data.py align --lr worldcover/*.tif --images 'tiles/*.tif' --out_dir labels
    python tools/prepare_data.py list  --images 'tiles/*.tif' --labels 'labels/{stem}_lr.tif' \\
                                       --out lists/area.csv --split spatial
    python tools/prepare_data.py stats --list_dir lists/area_train.csv --base OpenEarthMap_ESA_WorldCover \\
                                       --out my_area.json
    python tools/prepare_data.py check --list_dir lists/area_train.csv --dataset my_area.json

Errors in the input stop with one line naming the file (exit 2); ``check`` exits 1 when the list
would make training fail. The work is done by ``preparation/``; every option is declared in
:mod:`preparation.options`.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rasterio  # noqa: E402

from dataset import load_dataset, read_list  # noqa: E402
from dataset.errors import InputError, run_cli  # noqa: E402
from dataset.files import check_output_file  # noqa: E402
from dataset.options import Options, add_options  # noqa: E402
from preparation import align, checks, lists, statistics  # noqa: E402
from preparation.options import AlignOptions, CheckOptions, ListWriteOptions, StatsOptions, TileSourceOptions  # noqa: E402


def _progress(items):
    """tqdm on an interactive terminal, the plain iterable otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(items)
    return items


def _images(options: TileSourceOptions) -> list[str]:
    """Tiles from ``--list_dir`` (its image_fn column) or from the ``--images`` glob."""
    if options.list_dir:
        return [e.image for e in read_list(options.list_dir, required=("image_fn",), root=options.list_root or "csv")]
    return _glob(options.images)


def _glob(pattern: str) -> list[str]:
    images = sorted(glob.glob(pattern, recursive=True))
    if not images:
        raise InputError(f"{pattern}: no image matches this pattern")
    return images


def cmd_align(options: AlignOptions) -> int:
    table = colormap = None
    if options.class_map:
        definition = load_dataset(options.class_map)
        table, colormap = definition.lr_label, definition.colormap()
    with rasterio.Env(GDAL_CACHEMAX=options.cache_mb * 1024 * 1024):
        reports = align.align_tiles(_images(options), options.lr, options.out_dir, table=table,
                                    resampling=options.resampling, window=options.window, band=options.band,
                                    colormap=colormap, skip_existing=options.skip_existing,
                                    report=lambda r: print(r.line()))
    low = [r for r in reports if r.covered < 1]
    print(f"aligned {len(reports)} tiles into {options.out_dir}"
          + (f"; {len(low)} only partly covered by the LR product" if low else ""))
    return 0


def cmd_list(options: ListWriteOptions) -> int:
    rows, skipped = lists.build_rows(_glob(options.images), options.labels, options.hr_labels, options.strip,
                                     options.skip_missing)
    for image in skipped:
        print(f"skipped {image}: label missing")
    # Split (which reads every tile's georeferencing) before writing anything, so a failing split
    # leaves no list behind.
    outputs = [(options.out, list(range(len(rows))))]
    dropped: list[int] = []
    if options.split != "none":
        if options.split == "random":
            train, val = lists.random_split(len(rows), options.val_fraction, options.seed)
        else:
            bounds = lists.tile_bounds([r.image for r in rows])
            train, val, dropped = lists.spatial_split(bounds, options.val_fraction, options.seed, options.block_size)
        stem = os.path.splitext(options.out)[0]
        outputs += [(f"{stem}_train.csv", train), (f"{stem}_val.csv", val)]
    for path, _ in outputs:
        check_output_file(path, "--out")
    for path, indices in outputs:
        lists.write_list(path, [rows[i] for i in indices], options.absolute)
        print(f"{path}: {len(indices)} tiles")
    if dropped:
        print(f"{len(dropped)} tiles touch a val tile and are in neither split")
    return 0


def cmd_stats(options: StatsOptions) -> int:
    if options.out:
        check_output_file(options.out, "--out")
    target, bands = statistics.statistics_target(options.out, options.base, options.name) if options.out \
        else (None, None)
    moments = statistics.band_statistics(_images(options), windows=options.windows, size=options.size,
                                         seed=options.seed, bands=bands, progress=_progress)
    mean, std = moments.mean.tolist(), moments.std.tolist()
    print(f"{moments.count} valid pixels sampled")
    print("mean: " + ", ".join(f"{v:.2f}" for v in mean))
    print("std:  " + ", ".join(f"{v:.2f}" for v in std))
    if target is not None:
        definition = statistics.write_statistics(options.out, target, mean, std)
        print(f"{options.out}: dataset {definition.name!r} with the new mean and std")
    return 0


def cmd_check(options: CheckOptions) -> int:
    dataset = load_dataset(options.dataset)
    _, entries = options.read_list(dataset, ("image_fn", "label_fn"), check_exists=False)
    result = checks.check_list(entries, dataset, check_hr=options.hr, max_nodata=options.max_nodata,
                               chip=options.chip_size, progress=_progress)
    for line in result.errors:
        print(f"error: {line}")
    for line in result.warnings:
        print(f"warning: {line}")
    if options.verbose:
        for image, share in result.nodata.items():
            print(f"{image}: label {100 * share:.1f}% no data")
    print(result.summary(len(entries)))
    return 1 if result.errors else 0


COMMANDS = {
    "align": (AlignOptions, cmd_align),
    "list": (ListWriteOptions, cmd_list),
    "stats": (StatsOptions, cmd_stats),
    "check": (CheckOptions, cmd_check),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _) in COMMANDS.items():
        summary = (cls.__doc__ or "").split(":", 1)[-1].strip().rstrip(".")
        add_options(sub.add_parser(name, help=summary, description=summary), cls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    cls, run = COMMANDS[args.pop("command")]
    options: Options = cls(**args)
    options.check()
    return run(options)


if __name__ == "__main__":
    sys.exit(run_cli(main))
