"""Accuracy of a land-cover map against a high-resolution reference (docs/design.md §8.2 and §8.3).

Two parts:

* :func:`confusion_for_pair` streams one prediction GeoTIFF and its reference by windows and
  counts a confusion matrix; :func:`confusion_from_arrays` does the same for arrays.
* :func:`compute_metrics` and :func:`legacy_metrics` are pure functions of a confusion matrix.
* :func:`published_confusion` and :func:`published_confusion_for_pair` count the matrix exactly as
  the published evaluation did (docs/design.md §8.2), for ``mIoU.py --protocol published``.

Confusion-matrix convention (docs/design.md §8.3): with ``K`` evaluation classes (index 0 = no data),
``cm`` has shape ``(K, K + 1)``; row ``i`` counts reference class ``i + 1`` and column ``j`` the
predicted class ``j`` (column 0 = the model predicted "no data"). Reference no-data pixels are
never counted. A predicted 0 is therefore an error for the reference class of its row: a false
negative of that class and a false positive of none.

Undefined values (a class absent from both reference and prediction, or an empty matrix) are
``None``, which JSON writes as ``null``; they are left out of every mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dataset.errors import InputError
from dataset.raster_io import check_same_grid, open_raster, read_window

#: Pixels per window read by :func:`confusion_for_pair` (about 4 MB per uint8 band).
WINDOW_PIXELS = 1 << 22


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _kappa(correct: float, rows: np.ndarray, cols: np.ndarray, total: float) -> float | None:
    """Cohen's kappa from the agreement count and the row/column marginals."""
    if total <= 0:
        return None
    observed = correct / total
    expected = float(np.dot(rows, cols)) / (total * total)
    return float((observed - expected) / (1.0 - expected)) if expected < 1.0 else None


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _eval_class_names(class_names: Sequence[str], num_classes: int) -> list[str]:
    """Names of the ``num_classes`` matrix rows; a leading "no data" entry (index 0) is dropped."""
    names = list(class_names)
    if len(names) == num_classes + 1:
        names = names[1:]
    if len(names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a matrix with {num_classes} reference classes")
    return names


def _check_matrix(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[1] != cm.shape[0] + 1:
        raise ValueError(f"confusion matrix must have shape (K, K + 1), got {cm.shape}")
    if np.any(cm < 0):
        raise ValueError("confusion matrix has negative counts")
    return cm.astype(np.int64)


def confusion_from_arrays(ref: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Count a ``(K, K + 1)`` confusion matrix from evaluation-class arrays.

    Args:
        ref: reference classes ``0..K`` (any shape; 0 = no data, not counted).
        pred: predicted classes ``0..K``, same shape (0 = "no class", counted as an error).
        num_classes: ``K``, the number of real evaluation classes.

    Returns:
        int64 array ``(K, K + 1)``: rows reference 1..K, columns prediction 0..K.
    """
    ref = np.asarray(ref).ravel()
    pred = np.asarray(pred).ravel()
    if ref.shape != pred.shape:
        raise ValueError(f"reference has {ref.size} pixels, prediction {pred.size}")
    keep = ref > 0
    n = num_classes + 1
    codes = ref[keep].astype(np.int64) * n + pred[keep].astype(np.int64)
    counts = np.bincount(codes, minlength=n * n)
    if counts.size > n * n:
        raise ValueError(f"class index above {num_classes} in the reference or prediction")
    return counts.reshape(n, n)[1:]


def prediction_lut(dataset) -> np.ndarray:
    """Model class index -> evaluation class index (int16; -1 for classes without one)."""
    lut = np.full(dataset.num_classes, -1, dtype=np.int16)
    if dataset.prediction_to_eval:
        for model_class, eval_class in dataset.prediction_to_eval.items():
            if 0 <= model_class < lut.size:
                lut[model_class] = eval_class
    else:
        lut[:] = np.arange(dataset.num_classes)
    return lut


def _prediction_to_eval(pred: np.ndarray, lut: np.ndarray, source: str) -> np.ndarray:
    pred = np.asarray(pred).astype(np.int64, copy=False)
    bad = (pred < 0) | (pred >= lut.size)
    if not bad.any():
        bad = lut[pred] < 0
    if bad.any():
        codes = sorted({int(v) for v in np.unique(pred[bad])})
        raise InputError(f"{source}: predicted values {codes[:20]} are not classes of the dataset "
                         f"(expected 0..{lut.size - 1})")
    return lut[pred]


def confusion_for_pair(pred_path: str, ref_path: str, dataset, window_pixels: int = WINDOW_PIXELS) -> np.ndarray:
    """Confusion matrix of one prediction GeoTIFF against its HR reference, read by windows.

    The reference goes through ``dataset.hr_label`` (Chesapeake: 1 water, 2 tree canopy,
    3 low vegetation, 4/5/6 impervious, 0/15 no data); predictions go through
    ``dataset.prediction_to_eval`` when the model's classes differ from the evaluation classes.
    Memory is bounded by one window of ``window_pixels`` pixels, not by the tile.

    Args:
        pred_path: single-band class map (band 1 is read).
        ref_path: reference raster on the same grid.
        dataset: :class:`dataset.DatasetDefinition` with an ``hr_label`` table.

    Returns:
        int64 ``(K, K + 1)`` matrix, ``K = len(dataset.eval_names) - 1``.

    Raises:
        InputError: naming the file when it is missing or corrupt, when the grids (size, CRS,
            transform) differ, or when a reference code or predicted value is unknown.
    """
    if dataset.hr_label is None:
        raise InputError(f"dataset {dataset.name!r} has no HR reference table (hr_label)")
    num_classes = len(dataset.eval_names) - 1
    lut = prediction_lut(dataset)
    cm = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    with open_raster(ref_path, "reference") as ref_src, open_raster(pred_path, "prediction") as pred_src:
        check_same_grid(ref_src, pred_src)
        for ref, pred in _band1_strips(ref_src, pred_src, window_pixels):
            ref = dataset.hr_label.map(ref, source=ref_path)
            cm += confusion_from_arrays(ref, _prediction_to_eval(pred, lut, pred_path), num_classes)
    return cm


def _band1_strips(ref_src, pred_src, window_pixels: int):
    """``(reference, prediction)`` band-1 arrays of the same strip of rows, top to bottom."""
    rows = max(1, window_pixels // max(ref_src.width, 1))
    for row in range(0, ref_src.height, rows):
        window = ((row, min(row + rows, ref_src.height)), (0, ref_src.width))
        yield read_window(ref_src, window, bands=[1])[0], read_window(pred_src, window, bands=[1])[0]


#: Classes of the published evaluation: values 0..4 of reference and prediction, class 0 included.
PUBLISHED_CLASSES = 5


def published_confusion(ref: np.ndarray, pred: np.ndarray, source: str = "prediction") -> tuple[np.ndarray, int]:
    """The published evaluation's matrix of one pair of arrays (docs/design.md §8.2).

    Predictions equal to 5 count as 4; only pixels with ``0 <= ref < 5`` are counted, reference 0
    included as row 0 (no HR table, no no-data exclusion).

    Returns:
        ``(int64 (5, 5) matrix, rows reference 0..4, columns prediction 0..4; number of reference
        pixels dropped for lying outside 0..4)``.

    Raises:
        InputError: a kept pixel's prediction outside 0..5 (the published script fails there too).
    """
    ref = np.asarray(ref).astype(np.int64).ravel()
    pred = np.asarray(pred).astype(np.int64).ravel()
    pred = np.where(pred == 5, 4, pred)
    keep = (ref >= 0) & (ref < PUBLISHED_CLASSES)
    ref, pred = ref[keep], pred[keep]
    if pred.size and (pred.min() < 0 or pred.max() >= PUBLISHED_CLASSES):
        bad = sorted({int(v) for v in np.unique(pred[(pred < 0) | (pred >= PUBLISHED_CLASSES)])})
        raise InputError(f"{source}: predicted values {bad[:20]} are outside the published evaluation's 0..5")
    counts = np.bincount(ref * PUBLISHED_CLASSES + pred, minlength=PUBLISHED_CLASSES ** 2)
    return counts.reshape(PUBLISHED_CLASSES, PUBLISHED_CLASSES), int(keep.size - keep.sum())


def published_confusion_for_pair(pred_path: str, ref_path: str, reference_table=None,
                                 window_pixels: int = WINDOW_PIXELS) -> tuple[np.ndarray, int] | None:
    """:func:`published_confusion` of one prediction GeoTIFF and its reference, read by windows.

    Args:
        reference_table: optional :class:`dataset.definition.LabelTable` applied to the reference
            first (raw CCLC codes to 0..4, no data to 0); None reads the values as they are, as
            the published script did.

    Returns:
        The matrix and the dropped-pixel count, or None when the two rasters hold different
        numbers of pixels: the published script skips such a pair.

    Raises:
        InputError: unreadable files; equal pixel counts on different shapes (the published script
            would pair unrelated pixels); predictions outside 0..5.
    """
    with open_raster(ref_path, "reference") as ref_src, open_raster(pred_path, "prediction") as pred_src:
        if ref_src.width * ref_src.height != pred_src.width * pred_src.height:
            return None
        check_same_grid(ref_src, pred_src, check_georef=False)
        cm = np.zeros((PUBLISHED_CLASSES, PUBLISHED_CLASSES), dtype=np.int64)
        dropped = 0
        for ref, pred in _band1_strips(ref_src, pred_src, window_pixels):
            if reference_table is not None:
                ref = reference_table.map(ref, source=ref_path)
            one, lost = published_confusion(ref, pred, pred_path)
            cm += one
            dropped += lost
    return cm, dropped


def compute_metrics(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Correct accuracy figures of a ``(K, K + 1)`` confusion matrix (docs/design.md §8.3).

    * ``overall_accuracy`` = correct pixels / valid pixels (predicted 0 counts as wrong).
    * per class ``iou`` = TP / (TP + FP + FN), ``precision`` = TP / predicted,
      ``recall`` = TP / reference, ``pixel_share`` = reference pixels / valid pixels.
      A class absent from both reference and prediction has IoU ``None`` and is left out of the
      mean; a class in only one of them has IoU 0 and counts.
    * ``mean_iou`` = mean of the defined per-class IoUs; ``fw_iou`` = sum of reference share x IoU.
    * ``kappa``: Cohen's kappa, expected agreement from row and column marginals, predicted-0
      pixels in a "none" column that no reference row matches.
    * ``legacy``: the published figures (:func:`legacy_metrics`), for comparison with the paper.

    Args:
        cm: the matrix (see module docstring).
        class_names: the ``K`` class names, or ``K + 1`` with the "no data" name first.

    Returns:
        dict with ``valid_pixels``, ``overall_accuracy``, ``mean_iou``, ``fw_iou``, ``kappa``,
        ``per_class`` (name -> figures), ``confusion_matrix`` (rows, columns, counts) and ``legacy``.
    """
    cm = _check_matrix(cm)
    k = cm.shape[0]
    names = _eval_class_names(class_names, k)
    total = int(cm.sum())
    tp = np.diag(cm[:, 1:])
    ref = cm.sum(axis=1)
    pred = cm[:, 1:].sum(axis=0)

    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        per_class[name] = {
            "index": i + 1,
            "iou": _ratio(tp[i], ref[i] + pred[i] - tp[i]),
            "precision": _ratio(tp[i], pred[i]),
            "recall": _ratio(tp[i], ref[i]),
            "pixel_share": _ratio(ref[i], total),
            "reference_pixels": int(ref[i]),
            "predicted_pixels": int(pred[i]),
        }
    ious = [c["iou"] for c in per_class.values()]
    shares = [c["pixel_share"] for c in per_class.values()]

    return {
        "valid_pixels": total,
        "overall_accuracy": _ratio(tp.sum(), total),
        "mean_iou": _mean(ious),
        "fw_iou": (sum(s * v for s, v in zip(shares, ious) if v is not None and s is not None)
                   if total > 0 else None),
        "kappa": _kappa(tp.sum(), ref, pred, total),
        "predicted_nodata_pixels": int(cm[:, 0].sum()),
        "per_class": per_class,
        "confusion_matrix": {
            "rows": "reference",
            "columns": "prediction",
            "row_names": names,
            "column_names": ["no data"] + names,
            "counts": cm.tolist(),
        },
        "legacy": legacy_metrics(square_matrix(cm)),
    }


def square_matrix(cm: np.ndarray) -> np.ndarray:
    """The ``(K+1, K+1)`` matrix of the published script: a zero reference row 0 added on top."""
    cm = _check_matrix(cm)
    return np.vstack([np.zeros((1, cm.shape[1]), dtype=np.int64), cm])


def legacy_metrics(cm: np.ndarray, divisor: int = 4) -> dict[str, Any]:
    """The figures the published evaluation reports (docs/design.md §8.2), reproduced as defined there.

    They are **not** correct accuracy measures; report them only to compare with the paper.

    Args:
        cm: square ``(K+1, K+1)`` matrix, rows reference 0..K, columns prediction 0..K, class 0
            included as the published script keeps it (use :func:`square_matrix` on a matrix of
            :func:`confusion_for_pair`, whose reference row 0 is empty).
        divisor: the published hard-coded 4.

    Returns:
        dict with ``oa_mean_recall`` ("OA" in the paper: sum of per-class recall over classes
        present in the reference, divided by ``divisor``), ``miou_sum_over_4`` (sum of IoU over
        present classes / ``divisor``), ``fw_iou``, ``kappa`` (on the full matrix, class 0
        included), ``per_class_iou`` and ``frequency`` (class 0 included), and a ``note``.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"legacy metrics need a square matrix, got {cm.shape}")
    total = cm.sum()
    tp = np.diag(cm)
    rows = cm.sum(axis=1)
    cols = cm.sum(axis=0)
    present = rows > 0
    freq = rows / total if total > 0 else np.zeros_like(rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (rows + cols - tp)
        recall = tp / rows
    return {
        "oa_mean_recall": float(recall[present].sum() / divisor) if present.any() else None,
        "miou_sum_over_4": float(iou[present].sum() / divisor) if present.any() else None,
        "fw_iou": float((freq[present] * iou[present]).sum()) if present.any() else None,
        "kappa": _kappa(tp.sum(), rows, cols, total),
        "per_class_iou": [float(v) if p else None for v, p in zip(iou, present)],
        "frequency": [float(v) for v in freq],
        "note": "published evaluation (docs/design.md §8.2): 'OA' is mean per-class recall and 'mIoU' divides "
                f"by a fixed {divisor}; not correct metrics, reported only to compare with the paper",
    }
