"""Scoring a folder of class maps against the HR references of a tile list (what mIoU.py runs).

:func:`run_scoring` is ``mIoU.py`` without its argument parsing.

:func:`evaluate_pairs` sums one confusion matrix over all tiles (each streamed by windows with
:func:`scoring.metrics.confusion_for_pair`) and returns the metrics of
:func:`scoring.metrics.compute_metrics` plus per-tile figures. :func:`format_report` prints it and
:func:`append_summary` adds a row to a CSV (one row per checkpoint in ``auto_test.sh``).

:func:`evaluate_published` is the published evaluation, reproduced exactly so that a figure can be put
beside the paper's (``mIoU.py --protocol published``, docs/design.md §8.2).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from dataset import TileEntry, load_dataset
from dataset.errors import InputError
from dataset.files import atomic_output, check_output_file
from dataset.raster_io import open_raster
from mapping.writer import DATASET_TAG, PROVENANCE_TAG, describe_provenance, output_name
from scoring.figures import write_confusion_png
from scoring.metrics import compute_metrics, confusion_for_pair, legacy_metrics, published_confusion_for_pair
from scoring.options import ScoreOptions


def pair_predictions(entries: Sequence[TileEntry], pred_dir: str) -> list[tuple[str, str]]:
    """``(prediction, reference)`` paths for every list row, predictions named by :func:`output_name`.

    Raises:
        InputError: a row without ``hr_label_fn``, or a prediction that is not in ``pred_dir``.
    """
    pairs = []
    for entry in entries:
        if not entry.hr_label:
            raise InputError(f"{entry.image}: the list gives no hr_label_fn (HR reference) for this tile")
        pred = os.path.join(pred_dir, output_name(entry.image))
        if not os.path.isfile(pred):
            raise InputError(f"{pred}: prediction not found (for reference {entry.hr_label}); run test.py first")
        pairs.append((pred, entry.hr_label))
    return pairs


def dataset_from_prediction(pred_path: str):
    """The dataset definition that ``test.py`` stored in a class map's tags, or ``None``."""
    with open_raster(pred_path, "prediction") as src:
        text = src.tags().get(DATASET_TAG)
    if not text:
        return None
    try:
        return load_dataset(json.loads(text))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{pred_path}: unreadable {DATASET_TAG} tag ({exc})") from None


def find_prediction_dataset(pred_dir: str):
    """The dataset stored in the first class map of ``pred_dir`` that has one.

    Raises:
        InputError: the folder is missing or holds no tagged class map.
    """
    if not os.path.isdir(pred_dir):
        raise InputError(f"{pred_dir}: prediction folder not found")
    for name in sorted(os.listdir(pred_dir)):
        if name.endswith(".tif") and not name.startswith("."):
            found = dataset_from_prediction(os.path.join(pred_dir, name))
            if found is not None:
                return found
    raise InputError(f"{pred_dir}: no class map written by test.py here; give --dataset")


def common_provenance(predictions: Sequence[str]) -> str | None:
    """The :data:`mapping.writer.PROVENANCE_TAG` the maps share (None if none carries one).

    Raises:
        InputError: maps made by different checkpoints or window settings (a folder mixing runs).
    """
    found: dict[str, str] = {}
    for pred in predictions:
        with open_raster(pred, "prediction") as src:
            tag = src.tags().get(PROVENANCE_TAG)
        if tag is not None:  # maps of other programs carry none: nothing to compare
            found.setdefault(tag, pred)
    if len(found) > 1:
        (a, first), (b, second) = list(found.items())[:2]
        raise InputError(f"{second}: made with {describe_provenance(b)}, but {first} with {describe_provenance(a)}; "
                         "score maps of one checkpoint (re-map with test.py --overwrite)")
    return next(iter(found), None)


def evaluate_pairs(pairs: Iterable[tuple[str, str]], dataset,
                   progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Any]:
    """Score prediction/reference pairs with one confusion matrix summed over all tiles.

    Returns:
        :func:`scoring.metrics.compute_metrics` of the summed matrix, plus ``dataset`` (name) and
        ``tiles``: per tile ``prediction``, ``reference``, ``valid_pixels``,
        ``overall_accuracy`` and ``mean_iou``.
    """
    pairs = list(pairs)
    names = dataset.eval_names
    total = np.zeros((len(names) - 1, len(names)), dtype=np.int64)
    tiles = []
    for pred, ref in (progress(pairs) if progress else pairs):
        cm = confusion_for_pair(pred, ref, dataset)
        total += cm
        one = compute_metrics(cm, names)
        tiles.append({"prediction": pred, "reference": ref, "valid_pixels": one["valid_pixels"],
                      "overall_accuracy": one["overall_accuracy"], "mean_iou": one["mean_iou"]})
    result = compute_metrics(total, names)
    result["dataset"] = dataset.name
    result["tiles"] = tiles
    return result


#: The published evaluation loop stops this many pairs before the end of its list.
PUBLISHED_LEFT_OUT = 2
PUBLISHED_CLASS_NAMES = ("no data", "water", "tree canopy", "low vegetation", "impervious")


def evaluate_published(pairs: Sequence[tuple[str, str]], reference_table=None,
                       progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Any]:
    """The published evaluation, step by step (docs/design.md §8.2).

    * The last :data:`PUBLISHED_LEFT_OUT` pairs of the list are not scored (19 of the 21 New York
      evaluation tiles, in the published order of ``Chesapeake_NewYork_eval.csv``).
    * A pair whose rasters hold different numbers of pixels is skipped.
    * One 5 x 5 matrix over reference values 0..4 (0 kept as a class; values outside 0..4 dropped)
      and predictions 0..4 (5 counted as 4), summed over the scored pairs.
    * The figures of :func:`scoring.metrics.legacy_metrics`: "OA" = sum of recall / 4, "mIoU" =
      sum of IoU / 4 over the reference classes present, FWIoU, kappa over the whole matrix.

    Args:
        reference_table: None reads reference values as they are, as published (the script expects
            a reference already mapped to 0..4); a :class:`dataset.definition.LabelTable` maps raw
            codes first.
    """
    pairs = list(pairs)
    scored = pairs[:max(len(pairs) - PUBLISHED_LEFT_OUT, 0)]
    total = np.zeros((len(PUBLISHED_CLASS_NAMES),) * 2, dtype=np.int64)
    dropped, skipped = 0, []
    for pred, ref in (progress(scored) if progress else scored):
        counted = published_confusion_for_pair(pred, ref, reference_table)
        if counted is None:
            skipped.append(pred)
            continue
        total += counted[0]
        dropped += counted[1]
    result = legacy_metrics(total)
    result.update({
        "protocol": "published",
        "reference_values": "as stored" if reference_table is None else "mapped through the HR table",
        "class_names": list(PUBLISHED_CLASS_NAMES),
        "confusion_matrix": {"rows": "reference 0..4", "columns": "prediction 0..4", "counts": total.tolist()},
        "counted_pixels": int(total.sum()),
        "dropped_reference_pixels": dropped,
        "scored": [pred for pred, _ in scored if pred not in skipped],
        "skipped_pixel_count_differs": skipped,
        "not_scored_as_published": [pred for pred, _ in pairs[len(scored):]],
    })
    return result


def format_published_report(result: dict[str, Any]) -> str:
    """The published figures, labelled as such, with what was left out."""
    per_class = "   ".join(f"{name} {format_metric(iou)}" for name, iou in
                           zip(result["class_names"], result["per_class_iou"]))
    lines = [
        f"published evaluation (docs/design.md §8.2; these are the paper's figures, not correct metrics): "
        f"{len(result['scored'])} tiles scored, {result['counted_pixels']:,} pixels, reference values "
        f"{result['reference_values']}",
        f"  'OA' (sum of recall / 4) {format_metric(result['oa_mean_recall'])}   'mIoU' (sum of IoU / 4) "
        f"{format_metric(result['miou_sum_over_4'])}   FWIoU {format_metric(result['fw_iou'])}   "
        f"kappa {format_metric(result['kappa'])}",
        f"  IoU: {per_class}",
        "  not scored, as published (the last two pairs of the list): "
        + (", ".join(os.path.basename(p) for p in result["not_scored_as_published"]) or "none"),
    ]
    if result["skipped_pixel_count_differs"]:
        lines.append("  skipped, pixel counts differ: "
                     + ", ".join(os.path.basename(p) for p in result["skipped_pixel_count_differs"]))
    if result["dropped_reference_pixels"]:
        lines.append(f"  {result['dropped_reference_pixels']:,} reference pixels outside 0..4 were dropped, as "
                     "published; raw CCLC references lose impervious (5, 6) that way: see --published_reference")
    return "\n".join(lines)


def format_metric(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table of the per-class and overall figures, legacy figures labelled as such."""
    lines = [
        f"dataset {result.get('dataset', '?')}: {len(result.get('tiles', []))} tiles, "
        f"{result['valid_pixels']:,} valid reference pixels "
        f"({result['predicted_nodata_pixels']:,} predicted as no data)",
        "",
        f"{'class':<24}{'IoU':>8}{'precision':>11}{'recall':>8}{'share':>8}",
    ]
    for name, c in result["per_class"].items():
        iou, precision, recall, share = (format_metric(c[k]) for k in ("iou", "precision", "recall", "pixel_share"))
        lines.append(f"{name[:23]:<24}{iou:>8}{precision:>11}{recall:>8}{share:>8}")
    legacy = result["legacy"]
    lines += [
        "",
        f"mIoU {format_metric(result['mean_iou'])}   FWIoU {format_metric(result['fw_iou'])}   "
        f"OA {format_metric(result['overall_accuracy'])}   kappa {format_metric(result['kappa'])}",
        "(IoU n/a: class absent from both reference and prediction, left out of mIoU)",
        "",
        "legacy figures of the published evaluation (docs/design.md §8.2; compare with the paper only):",
        f"  'OA' (mean recall) {format_metric(legacy['oa_mean_recall'])}   'mIoU' (sum of IoU / 4) "
        f"{format_metric(legacy['miou_sum_over_4'])}   FWIoU {format_metric(legacy['fw_iou'])}   "
        f"kappa {format_metric(legacy['kappa'])}",
    ]
    return "\n".join(lines)


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def summary_row(result: dict[str, Any], label: str) -> dict[str, Any]:
    """One CSV row: label, tile and pixel counts, OA, mIoU, FWIoU, kappa, per-class IoU, legacy."""
    row: dict[str, Any] = {
        "checkpoint": label,
        "tiles": len(result.get("tiles", [])),
        "valid_pixels": result["valid_pixels"],
        "overall_accuracy": result["overall_accuracy"],
        "mean_iou": result["mean_iou"],
        "fw_iou": result["fw_iou"],
        "kappa": result["kappa"],
    }
    for name, c in result["per_class"].items():
        row[f"iou_{name.replace(' ', '_')}"] = c["iou"]
    row["legacy_oa_mean_recall"] = result["legacy"]["oa_mean_recall"]
    row["legacy_miou_sum_over_4"] = result["legacy"]["miou_sum_over_4"]
    return {k: ("" if v is None else (f"{v:.6f}" if isinstance(v, float) else v)) for k, v in row.items()}


def append_summary(csv_path: str, result: dict[str, Any], label: str) -> None:
    """Append :func:`summary_row` to ``csv_path`` (header written when the file is new).

    Raises:
        InputError: the existing file has other columns (e.g. another dataset's classes).
    """
    row = summary_row(result, label)
    exists = os.path.isfile(csv_path) and os.path.getsize(csv_path) > 0
    if exists:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        if header != list(row):
            raise InputError(f"{csv_path}: existing summary has columns {header}, expected {list(row)}")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    with open(csv_path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if not exists:
            writer.writeheader()
        writer.writerow(row)


def run_scoring(options: ScoreOptions, progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Any]:
    """Pair the maps of ``options.pred_dir`` with the list's references, score them, write what is asked.

    Returns:
        :func:`evaluate_pairs`'s result with ``pred_dir`` and ``list`` added.
    """
    for flag in ("json", "confusion_png", "summary_csv"):
        if getattr(options, flag):
            check_output_file(getattr(options, flag), f"--{flag}")  # before the scoring, not after it
    dataset = load_dataset(options.dataset) if options.dataset else find_prediction_dataset(options.pred_dir)
    list_path, entries = options.read_list(dataset, required=("image_fn", "hr_label_fn"))
    pairs = pair_predictions(entries, options.pred_dir)
    made_by = common_provenance([pred for pred, _ in pairs])
    if options.protocol == "published":
        if options.published_reference == "hr_table" and dataset.hr_label is None:
            raise InputError(f"--published_reference hr_table: dataset {dataset.name!r} has no HR table (hr_label)")
        table = dataset.hr_label if options.published_reference == "hr_table" else None
        result = evaluate_published(pairs, table, progress=progress)
    else:
        result = evaluate_pairs(pairs, dataset, progress=progress)
    result["pred_dir"] = options.pred_dir
    result["list"] = list_path
    result["maps_made_by"] = describe_provenance(made_by) if made_by else None  # which checkpoint is scored
    if not options.quiet:
        print(format_published_report(result) if options.protocol == "published" else format_report(result))
    if options.json:
        write_json(options.json, result)
    if options.confusion_png:
        cm = result["confusion_matrix"]
        write_confusion_png(options.confusion_png, cm["counts"], cm["row_names"], cm["column_names"])
    if options.summary_csv:
        append_summary(options.summary_csv, result, options.label or options.pred_dir)
    return result
