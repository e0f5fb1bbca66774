"""Map quality on the bundled sample: does a recipe's 1 m map beat the LR labels it was trained with?

Trains on the sample's NLCD labels only, maps, and scores the maps against the HR reference with
mIoU.py's code (:func:`scoring.metrics.confusion_for_pair`), side by side with NLCD's own agreement
on the same pixels. Four protocols:

* ``heldout``: two folds (even and odd patches). Each fold trains on four patches and maps the
  other four; the confusion matrices of both folds are summed, so every patch is scored once,
  by a model that never saw it. Chips per tile are doubled so that a fold trains as many steps
  as a run on all eight patches (the same training budget).
* ``halves``: every patch cut into its top and bottom halves. One fold trains on the eight top
  halves and maps the bottom ones, the other the reverse. Like ``heldout`` every pixel is scored
  once by a model that never saw it, but each fold trains on every patch's kind of land, so a
  class found in one patch only (the sample's one road, which crosses both halves of patch 0) is
  both learnt and scored: the held-out figure for a rare class that ``heldout`` cannot give.
  Same training budget (chips per half as per whole patch in ``update``).
* ``update``: train on all eight patches and map the same patches (updating an existing map).
* ``shifted``: the ``heldout`` folds (the same trained models, trained once when both run), with the
  test patches' bands moved to another NAIP tile's brightness and contrast: each band linearly, so
  that the sample's mean and spread over all its patches become those of the other tile
  (:data:`OTHER_TILE`). Models trained on one tile are used on tiles flown on other days; this is
  the sample's only view of how a recipe stands such a shift.

Every variant runs with each ``--seeds`` value; the table gives the mean and the spread
(sample standard deviation) over seeds. A gain smaller than the spread is not a gain. The HR
reference is used for scoring only.

Example (about 10 minutes per seed and variant, all four protocols, on a 2-core CPU)::

    python tools/sample_benchmark.py --seeds 1 2 3 --variant published="--recipe published" \\
        --variant robust="--recipe robust" --json runs/sample_benchmark.json

Seeds can run as separate processes (one per core, each with ``OMP_NUM_THREADS=1``, or on other
machines), each with its own ``--json``; ``--merge`` then gives the table over all their seeds::

    python tools/sample_benchmark.py --merge runs/seeds_1_2.json runs/seeds_3_4.json --json runs/all.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from rasterio.errors import NotGeoreferencedWarning  # noqa: E402

from dataset import TileEntry, load_dataset, read_list  # noqa: E402
from dataset.errors import InputError, run_cli  # noqa: E402
from dataset.files import atomic_output  # noqa: E402
from dataset.options import add_options  # noqa: E402
from dataset.raster_io import geotiff_profile, open_raster, read_window  # noqa: E402
from scoring.significance import fisher_exact_p, signed_rank_p_greater  # noqa: E402
from training.options import RECIPES, TrainOptions  # noqa: E402

#: Mean and spread per band (red, green, blue, nir) of another Chesapeake NAIP tile with the sample's
#: cover (m_3907833_nw_17_1: 79 % tree canopy, 15 % low vegetation; the sample 81 % and 19 %), from
#: its copy downsampled to about 25 m; darker in the visible bands than the sample (120, 132, 111, 116).
OTHER_TILE = {"red": (94.45, 46.17), "green": (111.78, 37.63), "blue": (96.63, 31.81), "nir": (114.38, 39.02)}

SAMPLE_LIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dataset", "sample",
                           "train.csv")


PROTOCOLS = ("heldout", "halves", "update", "shifted")
NLCD_ROW = "NLCD (the LR labels as a map)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=None, metavar="NAME=FLAGS",
                   help="a candidate: a name and the train.py flags it adds (repeat; default: published and "
                        "robust recipes)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of every variant (default: 1 2 3)")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS,
                   default=list(PROTOCOLS), help="(default: all four; shifted adds only mapping to heldout)")
    p.add_argument("--model_config", default="tiny", help="model size (default: tiny)")
    p.add_argument("--chip_size", type=int, default=64, help="training and mapping chip (default: 64)")
    p.add_argument("--stride", type=int, default=32, help="mapping stride (default: 32)")
    p.add_argument("--max_epochs", type=int, default=30, help="epochs (default: 30)")
    p.add_argument("--chips_per_tile", type=int, default=16,
                   help="chips per tile per epoch when training on all 8 patches; doubled for a 4-patch fold "
                        "(default: 16)")
    p.add_argument("--batch_size", type=int, default=8, help="batch (default: 8)")
    p.add_argument("--num_workers", type=int, default=0, help="loader processes (default: 0)")
    p.add_argument("--list_dir", default=SAMPLE_LIST, help="the sample list (image_fn, label_fn, hr_label_fn)")
    p.add_argument("--dataset", default="sample", help="dataset definition (default: sample)")
    p.add_argument("--work_dir", default=None, help="keep runs and maps here (default: a temporary folder, removed at "
                                                    "the end)")
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="train nothing: combine the runs of earlier --json files (the same settings and variants, "
                        "other seeds) into one table (and --json)")
    p.add_argument("--compare", default=None, metavar="BASE",
                   help="after the tables, every other variant against BASE in pairs of runs of the same seed and "
                        "protocol: mean mIoU difference, pairs higher, one-sided Wilcoxon signed-rank p (per "
                        "protocol and pooled), and per class the runs above NLCD's IoU with a two-sided Fisher p")
    args = p.parse_args(argv)
    if args.merge and (args.variant or args.seeds):
        p.error("--merge combines finished runs; it takes no --variant or --seeds")
    args.seeds = args.seeds or [1, 2, 3]
    return args


def variants(specs: list[str] | None) -> dict[str, list[str]]:
    specs = specs or ["published=--recipe published", "robust=--recipe robust"]
    out = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        if not name or not _:
            raise InputError(f"--variant {spec!r}: give NAME=FLAGS, e.g. robust='--recipe robust'")
        out[name] = shlex.split(flags)
    return out


def train_options(base: dict, flags: list[str]) -> TrainOptions:
    """TrainOptions from the benchmark's settings plus a variant's train.py flags."""
    parser = add_options(argparse.ArgumentParser(prog="variant"), TrainOptions)
    given = vars(parser.parse_args(flags))
    options = TrainOptions(**{**base, **given})
    options.check()
    return options


def recipe_options(options: TrainOptions) -> dict:
    """The recipe options a variant trained with, its preset resolved: the same flags (``--recipe robust``)
    mean other runs once a preset changes, so merged files are checked against these."""
    return {name: getattr(options, name) for name in RECIPES["published"]}


def reference_metrics(pairs: list[tuple[str, str]], dataset) -> dict:
    """mIoU.py's figures of the (map, reference) pairs, with mIoU taken over the classes present in the
    reference."""
    from scoring.report import evaluate_pairs

    figures = evaluate_pairs(pairs, dataset)
    per_class = figures["per_class"]
    present = {name: c["iou"] for name, c in per_class.items() if c["reference_pixels"] > 0}
    return {"overall_accuracy": figures["overall_accuracy"],
            "mean_iou": float(np.mean([v or 0.0 for v in present.values()])),
            "iou": {name: present.get(name) for name in per_class},
            "pixels": figures["valid_pixels"]}


def lr_label_map(entry: TileEntry, dataset, out: str) -> str:
    """The tile's LR label mapped to model classes, written as a 'prediction' (NLCD's own map)."""
    with open_raster(entry.label, "label") as src:
        classes = dataset.lr_label.map(read_window(src), source=entry.label)
        profile = geotiff_profile(width=src.width, height=src.height, count=1, crs=src.crs,
                                  transform=src.transform, nodata=0)
    write_raster(out, classes, profile)
    return out


def write_raster(out: str, data: np.ndarray, profile: dict) -> None:
    """Write ``data`` with ``profile`` to ``out`` (atomically; the sample's patches have no geotransform)."""
    import rasterio

    with warnings.catch_warnings(), atomic_output(out) as tmp:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)


def train(options: TrainOptions, entries: list[TileEntry], folder: str) -> tuple:
    """Train on ``entries``; returns what mapping needs: the final model as its maps use it (with the label
    model's vote under ``--label_model_weight``), the dataset, the device and the recipe's guided filter (the
    optimiser's state is let go)."""
    from preparation.lists import write_list
    from training.trainer import Trainer

    list_path = os.path.join(folder, "train.csv")
    write_list(list_path, entries, absolute=True)
    trainer = Trainer(dataclasses.replace(options, list_dir=list_path, out_dir=os.path.join(folder, "run")))
    trainer.fit()
    return trainer.mapping_model(), trainer.dataset, trainer.device, options.guided_filter


def map_tiles(trained: tuple, test: list[TileEntry], folder: str, chip_size: int, stride: int) -> list[tuple[str, str]]:
    """Map ``test`` with :func:`train`'s model; returns (map, HR reference) pairs."""
    from mapping.writer import map_tile, output_name

    model, dataset, device, guided_filter = trained
    pairs = []
    for entry in test:
        out = os.path.join(folder, "maps", output_name(entry.image))
        map_tile(model, entry.image, out, dataset=dataset, chip_size=chip_size, stride=stride, device=device,
                 overwrite=True, guided_filter=guided_filter)
        pairs.append((out, entry.hr_label))
    return pairs


def folds(entries: list[TileEntry], protocol: str, work: str,
          dataset=None) -> list[tuple[list[TileEntry], list[TileEntry]]]:
    """(train, test) splits: two interleaved folds for ``heldout`` (for ``shifted`` with the test images moved
    to :data:`OTHER_TILE`'s radiometry by :func:`shifted_images`), top against bottom halves for ``halves``
    (written under ``work``), all-on-all for ``update``."""
    if protocol == "update":
        return [(entries, entries)]
    if protocol == "halves":
        top, bottom = zip(*(halves(e, os.path.join(work, "halves")) for e in entries))
        return [(list(top), list(bottom)), (list(bottom), list(top))]
    even, odd = entries[0::2], entries[1::2]
    if protocol == "shifted":
        moved = dict(zip([e.image for e in entries], shifted_images(entries, dataset, os.path.join(work, "shifted_images"))))
        return [(even, [moved[e.image] for e in odd]), (odd, [moved[e.image] for e in even])]
    return [(even, odd), (odd, even)]


def shifted_images(entries: list[TileEntry], dataset, folder: str) -> list[TileEntry]:
    """``entries`` with their images moved band by band, ``(x - mean) / spread * spread' + mean'``, from the
    mean and spread of all ``entries``' pixels to :data:`OTHER_TILE`'s; rounded and clipped to 0-255."""
    missing = [band for band in dataset.bands if band not in OTHER_TILE]
    if missing:
        raise InputError(f"--protocols shifted: dataset {dataset.name!r} has bands {missing} without figures for the "
                         f"other tile (it has {sorted(OTHER_TILE)})")
    images = []
    for entry in entries:
        with open_raster(entry.image, "image") as src:
            if src.dtypes[0] != "uint8":
                raise InputError(f"{entry.image}: --protocols shifted needs 8-bit images, not {src.dtypes[0]}")
            images.append((read_window(src).astype(np.float64), src.profile))
    pixels = np.concatenate([data.reshape(data.shape[0], -1) for data, _ in images], axis=1)
    mean, spread = pixels.mean(axis=1), pixels.std(axis=1)
    target = np.array([OTHER_TILE[band] for band in dataset.bands])
    gain = target[:, 1] / spread
    out = []
    for entry, (data, profile) in zip(entries, images):
        moved = (data - mean[:, None, None]) * gain[:, None, None] + target[:, 0, None, None]
        path = os.path.join(folder, os.path.basename(entry.image))
        write_raster(path, np.clip(np.rint(moved), 0, 255).astype(np.uint8), profile)
        out.append(dataclasses.replace(entry, image=path))
    return out


def halves(entry: TileEntry, folder: str) -> tuple[TileEntry, TileEntry]:
    """The top and bottom halves of a tile's image, LR label and HR reference, written under ``folder``."""
    from rasterio.windows import Window

    parts = []
    for name, top in (("top", True), ("bottom", False)):
        paths = []
        for path, what in ((entry.image, "image"), (entry.label, "label"), (entry.hr_label, "HR label")):
            with open_raster(path, what) as src:
                split = src.height // 2
                first, rows = (0, split) if top else (split, src.height - split)
                window = Window(0, first, src.width, rows)
                data = read_window(src, window)
                profile = {**geotiff_profile(width=src.width, height=rows, count=src.count, crs=src.crs,
                                             transform=src.window_transform(window), nodata=src.nodata),
                           "dtype": src.dtypes[0]}
            out = os.path.join(folder, name, os.path.basename(path))
            write_raster(out, data, profile)
            paths.append(out)
        parts.append(TileEntry(*paths))
    return parts[0], parts[1]


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of OA, mIoU and each class IoU."""
    def spread(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}

    return {"overall_accuracy": spread([r["overall_accuracy"] for r in runs]),
            "mean_iou": spread([r["mean_iou"] for r in runs]),
            "iou": {name: spread([r["iou"][name] for r in runs]) for name in runs[0]["iou"]}}


def format_row(name: str, summary: dict, classes: Sequence[str]) -> str:
    def cell(value):
        if value is None:
            return f"{'-':>15}"
        if isinstance(value, dict):
            return f"{value['mean']:>8.3f} ±{value['std']:.3f}"
        return f"{value:>15.3f}"

    return (f"{name:<28}" + cell(summary["mean_iou"]) + cell(summary["overall_accuracy"])
            + "".join(cell(summary["iou"][c]) for c in classes))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge_runs(args.merge, args.json, args.compare)
    named = variants(args.variant)
    if args.compare:
        check_compare_base(args.compare, list(named))  # before hours of training, not after
    dataset = load_dataset(args.dataset)
    entries = read_list(args.list_dir, required=("image_fn", "label_fn", "hr_label_fn"))
    if len(entries) < 2:
        raise InputError(f"{args.list_dir}: the held-out protocol needs at least two tiles")
    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="vcnet_sample_benchmark_") as work:
            return run_benchmark(args, named, dataset, entries, work)
    return run_benchmark(args, named, dataset, entries, args.work_dir)


def run_benchmark(args: argparse.Namespace, named: dict[str, list[str]], dataset, entries: list[TileEntry],
                  work: str) -> int:
    base = dict(dataset=args.dataset, model_config=args.model_config, chip_size=args.chip_size,
                max_epochs=args.max_epochs, batch_size=args.batch_size, num_workers=args.num_workers,
                device="cpu", save_interval=args.max_epochs, overwrite=True)
    results: dict = {"settings": vars(args), "variants": {n: " ".join(f) for n, f in named.items()},
                     "recipe_options": {n: recipe_options(train_options(base, f)) for n, f in named.items()},
                     "protocols": {}}
    classes = dataset.eval_names[1:]
    trained: dict = {}  # heldout's models, kept for shifted (and the reverse) when both run
    shared = {"heldout", "shifted"} if {"heldout", "shifted"} <= set(args.protocols) else set()
    for protocol in args.protocols:
        splits = folds(entries, protocol, work, dataset)
        per_tile_chips = args.chips_per_tile * len(entries) // len(splits[0][0])
        nlcd_pairs = [(lr_label_map(e, dataset, os.path.join(work, "nlcd", protocol, str(index),
                                                             os.path.basename(e.label))), e.hr_label)
                      for index, (_, test) in enumerate(splits) for e in test]
        nlcd = reference_metrics(nlcd_pairs, dataset)
        table = {NLCD_ROW: {**nlcd, "runs": [nlcd]}}
        for name, flags in named.items():
            runs = []
            for seed in args.seeds:
                options = train_options({**base, "seed": seed, "chips_per_tile": per_tile_chips}, flags)
                start = time.perf_counter()
                pairs = []
                for index, (train_on, test) in enumerate(splits):
                    folder = os.path.join(work, protocol, name, f"seed{seed}", f"fold{index}")
                    key = (name, seed, index)  # shifted trains exactly as heldout: the same models, trained once
                    model = trained.get(key) if protocol in shared else None
                    if model is None:
                        model = train(options, train_on, folder)
                        if protocol in shared:
                            trained[key] = model
                    pairs += map_tiles(model, test, folder, options.chip_size, args.stride)
                run = reference_metrics(pairs, dataset)
                run["seed"], run["seconds"] = seed, round(time.perf_counter() - start, 1)
                runs.append(run)
                print(f"{protocol} {name} seed {seed}: mIoU {run['mean_iou']:.3f}, OA {run['overall_accuracy']:.3f}, "
                      f"impervious IoU {run['iou']['impervious'] or 0:.3f} ({run['seconds']:.0f} s)", file=sys.stderr)
            table[name] = {**summarise(runs), "runs": runs}
        results["protocols"][protocol] = table
        print_table(protocol, table, classes)
    if args.compare:
        results["comparisons"] = print_comparisons(results["protocols"], args.compare)
    write_json(args.json, results)
    return 0


def print_table(protocol: str, table: dict, classes: Sequence[str]) -> None:
    """One protocol's rows: NLCD's figures, then each variant's mean ± spread over its seeds (named in the row
    when they are not every seed of the table)."""
    seeds = {name: sorted(run["seed"] for run in summary["runs"]) for name, summary in table.items() if name != NLCD_ROW}
    every = sorted({seed for runs in seeds.values() for seed in runs})
    print(f"\n{protocol}: {table[NLCD_ROW]['pixels']:,} scored pixels; mean ± std over seeds {every}; IoU of classes "
          "present in the reference")
    print(f"{'':<28}{'mIoU':>15}{'OA':>15}" + "".join(f"{c[:14]:>15}" for c in classes))
    for name, summary in table.items():
        label = name if seeds.get(name, every) == every else f"{name} (seeds {' '.join(map(str, seeds[name]))})"
        print(format_row(label, summary, classes))
    for name in seeds:
        print(seed_line(name, table[name]["runs"], table[NLCD_ROW], classes))


def compare_variant(protocols: dict, name: str, base: str) -> dict:
    """``name`` against ``base`` in pairs of runs with the same protocol and seed: per protocol and pooled, the
    mean mIoU difference, the pairs where ``name`` is higher and the one-sided signed-rank p that it is; per
    class present, in how many of the paired runs each is above NLCD's IoU, and the two-sided Fisher p."""
    per_protocol, pooled, above = {}, [], {}
    for protocol, table in protocols.items():
        if name not in table or base not in table:
            continue
        ours = {run["seed"]: run for run in table[name]["runs"]}
        theirs = {run["seed"]: run for run in table[base]["runs"]}
        seeds = sorted(set(ours) & set(theirs))
        if not seeds:
            continue
        differences = [ours[seed]["mean_iou"] - theirs[seed]["mean_iou"] for seed in seeds]
        pooled += differences
        per_protocol[protocol] = paired_figures(differences, seeds)
        for cls, nlcd_iou in table[NLCD_ROW]["iou"].items():
            if nlcd_iou is None:
                continue
            counts = above.setdefault(cls, {"variant": 0, "base": 0, "runs": 0})
            counts["variant"] += sum((ours[seed]["iou"][cls] or 0) > nlcd_iou for seed in seeds)
            counts["base"] += sum((theirs[seed]["iou"][cls] or 0) > nlcd_iou for seed in seeds)
            counts["runs"] += len(seeds)
    for counts in above.values():
        counts["fisher_p"] = fisher_exact_p(counts["variant"], counts["runs"], counts["base"], counts["runs"])
    return {"base": base, "protocols": per_protocol, "pooled": paired_figures(pooled) if pooled else None,
            "above_nlcd": above}


def paired_figures(differences: list[float], seeds: list[int] | None = None) -> dict:
    """Figures of paired differences (variant minus base): their count, mean, how many are above 0, and p."""
    return {**({"seeds": seeds} if seeds is not None else {}), "pairs": len(differences),
            "mean_difference": float(np.mean(differences)), "higher": sum(d > 0 for d in differences),
            "p_greater": signed_rank_p_greater(differences)}


def check_compare_base(base: str, names: list[str]) -> None:
    """``--compare BASE`` must name one of the variants ``names``."""
    if base not in names:
        raise InputError(f"--compare {base!r}: no such variant (the runs have {', '.join(names)})")


def print_comparisons(protocols: dict, base: str) -> dict:
    """``--compare``: every variant but ``base`` against it (:func:`compare_variant`), printed; the figures."""
    names = [name for name in dict.fromkeys(n for table in protocols.values() for n in table) if name != NLCD_ROW]
    check_compare_base(base, names)
    out = {}
    for name in (n for n in names if n != base):
        figures = out[name] = compare_variant(protocols, name, base)
        print(f"\n{name} against {base}, runs paired by protocol and seed (p: one-sided Wilcoxon signed-rank test "
              f"that {name}'s mIoU is higher)")
        rows = {**figures["protocols"], **({"pooled": figures["pooled"]} if figures["pooled"] else {})}
        for label, row in rows.items():
            print(f"  {label:<8} {row['pairs']:>3} pairs: mIoU {row['mean_difference']:+.4f}, higher in "
                  f"{row['higher']}, p = {row['p_greater']:.3f}")
        if figures["above_nlcd"]:
            print("  runs above NLCD's IoU (two-sided Fisher p): " + ", ".join(
                f"{cls} {c['variant']} against {c['base']} of {c['runs']} (p = {c['fisher_p']:.3f})"
                for cls, c in figures["above_nlcd"].items()))
    return out


def seed_line(name: str, runs: list[dict], nlcd: dict, classes: Sequence[str]) -> str:
    """A variant's mIoU seed by seed, and in how many seeds each figure is above NLCD's."""
    def above(figure):
        return f"{sum((figure(run) or 0) > (figure(nlcd) or 0) for run in runs)}/{len(runs)}"

    counts = [f"mIoU {above(lambda r: r['mean_iou'])}", f"OA {above(lambda r: r['overall_accuracy'])}"]
    counts += [f"{c} {above(lambda r, c=c: r['iou'][c])}" for c in classes if nlcd["iou"].get(c) is not None]
    return (f"  {name}: mIoU by seed ({' '.join(str(r['seed']) for r in runs)}) "
            + " / ".join(f"{r['mean_iou']:.3f}" for r in runs) + "; above NLCD in " + ", ".join(counts))


def write_json(path: str | None, results: dict) -> None:
    if path:
        with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


#: Settings that must agree for runs from several files to be one table.
#: (The tiles are compared by NLCD's own figures on them, not by the list's path, which names the checkout.)
MERGED_SETTINGS = ("model_config", "chip_size", "stride", "max_epochs", "chips_per_tile", "batch_size", "dataset")


def read_results(path: str) -> dict:
    """A ``--json`` file of this tool (an InputError naming the file otherwise)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise InputError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict) or not {"settings", "variants", "protocols"} <= set(data):
        raise InputError(f"{path}: not a sample_benchmark.py --json file (no settings, variants and protocols)")
    return data


def merge_runs(paths: Sequence[str], out: str | None, compare: str | None = None) -> int:
    """``--merge``: one table (and JSON) from the runs of several ``--json`` files of the same settings and
    variants: each (protocol, variant) gets every seed found, once; with ``compare``, the variants against it."""
    loaded = [(path, read_results(path)) for path in paths]
    first = loaded[0][1]
    flags: dict[str, str] = {}
    recipes: dict[str, dict] = {}
    nlcd: dict[str, dict] = {}
    runs: dict[str, dict[str, dict[int, dict]]] = {}  # protocol -> variant -> seed -> run
    for path, data in loaded:
        for key in MERGED_SETTINGS:
            if data["settings"].get(key) != first["settings"].get(key):
                raise InputError(f"{path}: {key} {data['settings'].get(key)!r}, but {paths[0]} has "
                                 f"{first['settings'].get(key)!r}: runs of other settings are not one table")
        for name, given in data["variants"].items():
            if flags.setdefault(name, given) != given:
                raise InputError(f"{path}: variant {name!r} is {given!r}, in an earlier file {flags[name]!r}: give "
                                 "variants of other flags other names")
        for name, given in data.get("recipe_options", {}).items():  # absent from files of before 2026-12-06
            earlier = recipes.setdefault(name, given)
            changed = [f"--{key} {given.get(key)!r} (earlier {earlier.get(key)!r})" for key in sorted({*given, *earlier})
                       if given.get(key) != earlier.get(key)]
            if changed:
                raise InputError(f"{path}: variant {name!r} trained with {', '.join(changed)}: its preset changed "
                                 "between the files; give the runs of each preset their own name")
        for protocol, table in data["protocols"].items():
            known = nlcd.setdefault(protocol, table[NLCD_ROW])
            figures = {k: table[NLCD_ROW][k] for k in ("pixels", "mean_iou", "overall_accuracy")}
            if any(known[k] != v for k, v in figures.items()):
                raise InputError(f"{path}: NLCD's {protocol} figures {figures} differ from an earlier file's: runs "
                                 "on other tiles are not one table")
            for name, summary in table.items():
                if name == NLCD_ROW:
                    continue
                by_seed = runs.setdefault(protocol, {}).setdefault(name, {})
                for run in summary["runs"]:
                    if run["seed"] in by_seed:
                        raise InputError(f"{path}: seed {run['seed']} of {name!r} ({protocol}) is already in "
                                         "another file: merge each seed once")
                    by_seed[run["seed"]] = run
    merged = {"settings": {**first["settings"], "seeds": None, "merge": list(paths)}, "variants": flags,
              "recipe_options": recipes, "protocols": {}}
    for protocol, by_name in runs.items():
        table = {NLCD_ROW: nlcd[protocol]}
        for name, by_seed in by_name.items():
            ordered = [by_seed[seed] for seed in sorted(by_seed)]
            table[name] = {**summarise(ordered), "runs": ordered}
        merged["protocols"][protocol] = table
        print_table(protocol, table, list(nlcd[protocol]["iou"]))
    if compare:
        merged["comparisons"] = print_comparisons(merged["protocols"], compare)
    write_json(out, merged)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
