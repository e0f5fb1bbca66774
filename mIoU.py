"""Score class maps against HR reference land cover: per-class IoU, mIoU, FWIoU, OA, kappa (spec 8).

Example::

    python mIoU.py --pred_dir predictions/ --list_dir dataset/CSV_list/Chesapeake_NewYork_eval.csv \\
        --json predictions/metrics.json

Each ``hr_label_fn`` of the list is paired with ``PRED_DIR/<name>`` (the name test.py gives the
map of ``image_fn``). Reference codes go through the dataset's HR table (Chesapeake: 1 water,
2 tree canopy, 3 low vegetation, 4/5/6 impervious, 0/15 no data, excluded). One confusion matrix
is summed over all tiles, reading both rasters by windows. The published figures ("OA" = mean
recall, "mIoU" = sum / 4) are reported too, labelled legacy. See docs/mapping.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tiles.errors import InputError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred_dir", required=True, help="folder of class maps written by test.py")
    p.add_argument("--list_dir", default=None,
                   help="CSV list with image_fn and hr_label_fn; default: the dataset's list")
    p.add_argument("--list_root", choices=("csv", "repo"), default=None,
                   help="resolve relative paths against the CSV's folder or the repository root "
                        "(default: 'repo' for lists beside the dataset's default list, else 'csv')")
    p.add_argument("--dataset", default=None,
                   help="dataset definition (name or JSON); default: the one test.py stored in the maps")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    p.add_argument("--confusion_png", default=None, help="write the row-normalised confusion matrix as a PNG")
    p.add_argument("--summary_csv", default=None, help="append one summary row to this CSV (auto_test.sh)")
    p.add_argument("--label", default=None, help="first column of the summary row (default: PRED_DIR)")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from dataset import load_dataset, read_list
    from tiles.evaluation import (
        append_summary,
        evaluate_pairs,
        find_prediction_dataset,
        format_report,
        pair_predictions,
        write_json,
    )
    from tiles.mapping import list_root_for
    from tiles.preview import write_confusion_png

    dataset = load_dataset(args.dataset) if args.dataset else find_prediction_dataset(args.pred_dir)
    list_path = args.list_dir or dataset.default_list()
    if not list_path:
        raise InputError(f"dataset {dataset.name!r} has no default list: give --list_dir")
    entries = read_list(list_path, required=("image_fn", "hr_label_fn"),
                        root=list_root_for(list_path, dataset, args.list_root))
    pairs = pair_predictions(entries, args.pred_dir)
    result = evaluate_pairs(pairs, dataset,
                            progress=None if args.quiet else lambda items: tqdm(items, desc="tiles", unit="tile"))
    result["pred_dir"] = args.pred_dir
    result["list"] = list_path
    if not args.quiet:
        print(format_report(result))
    if args.json:
        write_json(args.json, result)
    if args.confusion_png:
        cm = result["confusion_matrix"]
        write_confusion_png(args.confusion_png, cm["counts"], cm["row_names"], cm["column_names"])
    if args.summary_csv:
        append_summary(args.summary_csv, result, args.label or args.pred_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
