"""Prepare your own data for train.py: align LR labels to HR tiles, write lists, band statistics, checks.

One step per subcommand (docs/prepare_data.md walks through a new area end to end):

    python tools/prepare_data.py align --lr worldcover/*.tif --images 'tiles/*.tif' --out_dir labels
    python tools/prepare_data.py list  --images 'tiles/*.tif' --labels 'labels/{stem}_lr.tif' \\
                                       --out lists/area.csv --split spatial
    python tools/prepare_data.py stats --list_dir lists/area_train.csv --base OpenEarthMap_ESA_WorldCover \\
                                       --out my_area.json
    python tools/prepare_data.py check --list_dir lists/area_train.csv --dataset my_area.json

Errors in the input stop with one line naming the file (exit 2); ``check`` exits 1 when the list
would make training fail.
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
from tiles import align, prepare  # noqa: E402
from tiles.errors import InputError, run_cli  # noqa: E402


def _progress(items):
    """tqdm on an interactive terminal, the plain iterable otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(items)
    return items


def _images(args: argparse.Namespace) -> list[str]:
    """Tiles from ``--list_dir`` (its image_fn column) or from the ``--images`` glob."""
    if getattr(args, "list_dir", None):
        return [e.image for e in read_list(args.list_dir, required=("image_fn",), root=args.root)]
    images = sorted(glob.glob(args.images, recursive=True))
    if not images:
        raise InputError(f"{args.images}: no image matches this pattern")
    return images


def _add_root(parser: argparse.ArgumentParser, default: str | None = "csv") -> None:
    parser.add_argument("--root", choices=("csv", "repo"), default=default,
                        help="relative paths in the list resolve against the CSV's folder or the repository "
                             f"(default: {default or 'as the dataset does for lists beside its own list, else csv'})")


def cmd_align(args: argparse.Namespace) -> int:
    table = colormap = None
    if args.class_map:
        definition = load_dataset(args.class_map)
        table, colormap = definition.lr_label, definition.colormap()
    with rasterio.Env(GDAL_CACHEMAX=args.cache_mb * 1024 * 1024):
        reports = align.align_tiles(_images(args), args.lr, args.out_dir, table=table, resampling=args.resampling,
                                    window=args.window, band=args.band, colormap=colormap,
                                    skip_existing=args.skip_existing, report=lambda r: print(r.line()))
    low = [r for r in reports if r.covered < 1]
    print(f"aligned {len(reports)} tiles into {args.out_dir}"
          + (f"; {len(low)} only partly covered by the LR product" if low else ""))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows, skipped = prepare.build_rows(_images(args), args.labels, args.hr_labels, args.strip, args.skip_missing)
    for image in skipped:
        print(f"skipped {image}: label missing")
    prepare.write_list(args.out, rows, args.absolute)
    print(f"{args.out}: {len(rows)} tiles")
    if args.split == "none":
        return 0
    if args.split == "random":
        train, val = prepare.random_split(len(rows), args.val_fraction, args.seed)
        dropped: list[int] = []
    else:
        bounds = prepare.tile_bounds([r.image for r in rows])
        train, val, dropped = prepare.spatial_split(bounds, args.val_fraction, args.seed, args.block_size)
    stem = os.path.splitext(args.out)[0]
    for part, indices in (("train", train), ("val", val)):
        prepare.write_list(f"{stem}_{part}.csv", [rows[i] for i in indices], args.absolute)
        print(f"{stem}_{part}.csv: {len(indices)} tiles")
    if dropped:
        print(f"{len(dropped)} tiles touch a val tile and are in neither split")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    if (args.base or args.name) and not args.out:
        raise InputError("--base and --name need --out FILE (the definition to write)")
    target, bands = prepare.statistics_target(args.out, args.base, args.name) if args.out else (None, None)
    moments = prepare.band_statistics(_images(args), windows=args.windows, size=args.size, seed=args.seed,
                                      bands=bands, progress=_progress)
    mean, std = moments.mean.tolist(), moments.std.tolist()
    print(f"{moments.count} valid pixels sampled")
    print("mean: " + ", ".join(f"{v:.2f}" for v in mean))
    print("std:  " + ", ".join(f"{v:.2f}" for v in std))
    if target is not None:
        definition = prepare.write_statistics(args.out, target, mean, std)
        print(f"{args.out}: dataset {definition.name!r} with the new mean and std")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    dataset = load_dataset(args.dataset)
    own = dataset.default_list()
    csv_path = args.list_dir or own
    if csv_path is None:
        raise InputError(f"dataset {dataset.name!r} has no default list; give --list_dir")
    root = args.root
    if root is None:
        beside_own = own is not None and os.path.dirname(os.path.abspath(csv_path)) == os.path.dirname(own)
        root = dataset.list_root if beside_own else "csv"
    entries = read_list(csv_path, required=("image_fn", "label_fn"), root=root, check_exists=False)
    result = prepare.check_list(entries, dataset, check_hr=args.hr, max_nodata=args.max_nodata, chip=args.chip,
                                progress=_progress)
    for line in result.errors:
        print(f"error: {line}")
    for line in result.warnings:
        print(f"warning: {line}")
    if args.verbose:
        for image, share in result.nodata.items():
            print(f"{image}: label {100 * share:.1f}% no data")
    print(result.summary(len(entries)))
    return 1 if result.errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("align", help="reproject an LR land-cover product onto each HR tile's grid (<tile>_lr.tif)")
    p.add_argument("--lr", nargs="+", required=True, metavar="PATH",
                   help="LR raster(s): files, a VRT, quoted glob patterns, or a .txt file listing one path a line; "
                        "where they overlap, the first given wins")
    p.add_argument("--out_dir", required=True, help="folder for the <tile stem>_lr.tif labels")
    tiles_from = p.add_mutually_exclusive_group(required=True)
    tiles_from.add_argument("--list_dir", metavar="CSV", help="take the tiles from a list's image_fn column")
    tiles_from.add_argument("--images", metavar="GLOB", help="take the tiles from a (quoted) glob pattern")
    _add_root(p)
    p.add_argument("--class_map", metavar="NAME",
                   help="map raw codes to class indices with this dataset definition's lr_label table "
                        "(a name such as OpenEarthMap_ESA_WorldCover, or a JSON path); default: copy raw codes")
    p.add_argument("--resampling", choices=sorted(align.RESAMPLING), default="nearest",
                   help="nearest (default) or mode (majority; for tiles coarser than the LR product)")
    p.add_argument("--band", type=int, default=1, help="band of the LR product to use (default 1)")
    p.add_argument("--window", type=int, default=align.WINDOW, help="output window side in pixels (memory bound)")
    p.add_argument("--cache_mb", type=int, default=256, help="GDAL block cache in MiB (default 256)")
    p.add_argument("--skip_existing", action="store_true", help="keep labels that are already in --out_dir")
    p.set_defaults(run=cmd_align)

    p = sub.add_parser("list", help="write a tile list CSV (image_fn,label_fn[,hr_label_fn]), optionally split")
    p.add_argument("--images", required=True, metavar="GLOB", help="image tiles (a quoted glob pattern)")
    p.add_argument("--labels", required=True, metavar="PATTERN",
                   help="label path per image, with {stem}, {name}, {dir} or {key}, e.g. 'labels/{stem}_lr.tif'")
    p.add_argument("--hr_labels", metavar="PATTERN", help="HR reference path per image (same placeholders)")
    p.add_argument("--strip", default="", metavar="SUFFIX",
                   help="{key} is the image stem without this suffix (e.g. _naip-new)")
    p.add_argument("--out", required=True, metavar="CSV",
                   help="the list to write (with a split also <out>_train.csv and <out>_val.csv)")
    p.add_argument("--split", choices=("none", "random", "spatial"), default="none",
                   help="random: seeded draw of tiles; spatial: whole blocks of tiles by their centre, train tiles "
                        "touching val tiles dropped")
    p.add_argument("--val_fraction", type=float, default=0.2, help="share of tiles for val (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--block_size", type=float,
                   help="spatial block side in CRS units (default 4 x the median tile side)")
    p.add_argument("--absolute", action="store_true", help="write absolute paths (default: relative to the CSV)")
    p.add_argument("--skip_missing", action="store_true", help="leave out images whose label is missing")
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("stats", help="per-band mean and std of the listed images (sampled windows)")
    p.add_argument("--list_dir", required=True, metavar="CSV", help="the tile list")
    _add_root(p)
    p.add_argument("--out", metavar="FILE", help="definition JSON to write the mean/std into")
    p.add_argument("--base", metavar="NAME", help="start --out from this definition (name or JSON path)")
    p.add_argument("--name", help="dataset name in --out (default: its file stem when --base is given)")
    p.add_argument("--windows", type=int, default=16, help="random windows per tile (default 16)")
    p.add_argument("--size", type=int, default=256, help="window side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.set_defaults(run=cmd_stats)

    p = sub.add_parser("check", help="validate a list against a dataset definition before a long run")
    p.add_argument("--list_dir", metavar="CSV", help="the tile list (default: the dataset's own list)")
    p.add_argument("--dataset", required=True, help="definition name or JSON path")
    _add_root(p, default=None)
    p.add_argument("--hr", action="store_true", help="also check the hr_label_fn column against the HR table")
    p.add_argument("--max_nodata", type=float, default=0.5, help="warn when a label has this share of no data")
    p.add_argument("--chip", type=int, default=224, help="training chip size (warn on smaller tiles)")
    p.add_argument("--verbose", action="store_true", help="print the label nodata share of every tile")
    p.set_defaults(run=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
