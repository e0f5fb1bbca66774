"""Accuracy metrics (docs/design.md §8.2, 8.3) against hand-computed confusion matrices, and windowed counting."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from dataset import load_dataset
from dataset.errors import InputError
from scoring.metrics import compute_metrics, confusion_for_pair, confusion_from_arrays, legacy_metrics, square_matrix
from scoring.report import append_summary, evaluate_pairs, format_report, pair_predictions
from tests.helpers import GEOREF_DIR, write_geotiff

NAMES = ["water", "tree canopy", "low vegetation", "impervious"]

# Rows: reference water, tree, low vegetation, impervious (absent). Columns: predicted
# none (0), water, tree, low vegetation, impervious.
CM = np.array([
    [2, 5, 1, 0, 0],
    [0, 1, 8, 1, 0],
    [1, 0, 2, 6, 1],
    [0, 0, 0, 0, 0],
])


def test_hand_computed_matrix():
    m = compute_metrics(CM, NAMES)
    assert m["valid_pixels"] == 28
    assert m["predicted_nodata_pixels"] == 3
    # Predicted "none" is wrong: 19 correct of 28, not of 25.
    assert m["overall_accuracy"] == pytest.approx(19 / 28)
    iou = [5 / 9, 8 / 13, 6 / 11, 0.0]  # TP / (ref + predicted - TP); impervious predicted once, never true
    assert [c["iou"] for c in m["per_class"].values()] == pytest.approx(iou)
    assert m["mean_iou"] == pytest.approx(sum(iou) / 4)
    assert [c["precision"] for c in m["per_class"].values()] == pytest.approx([5 / 6, 8 / 11, 6 / 7, 0.0])
    recall = [c["recall"] for c in m["per_class"].values()]
    assert recall[:3] == pytest.approx([5 / 8, 8 / 10, 6 / 10]) and recall[3] is None
    assert [c["pixel_share"] for c in m["per_class"].values()] == pytest.approx([8 / 28, 10 / 28, 10 / 28, 0])
    assert m["fw_iou"] == pytest.approx(8 / 28 * 5 / 9 + 10 / 28 * 8 / 13 + 10 / 28 * 6 / 11)
    # po = 19/28; pe = (8*6 + 10*11 + 10*7 + 0*1) / 28^2, the "none" column matching no row.
    assert m["kappa"] == pytest.approx((19 / 28 - 228 / 784) / (1 - 228 / 784))
    assert m["confusion_matrix"]["counts"] == CM.tolist()
    assert m["confusion_matrix"]["column_names"] == ["no data"] + NAMES


def test_class_names_may_include_no_data_first():
    with_nodata = compute_metrics(CM, ["no data"] + NAMES)
    assert list(with_nodata["per_class"]) == NAMES
    with pytest.raises(ValueError):
        compute_metrics(CM, NAMES[:3])


def test_class_absent_from_reference_and_prediction_is_left_out():
    cm = CM.copy()
    cm[2, 4] = 0  # impervious now never predicted either
    m = compute_metrics(cm, NAMES)
    imp = m["per_class"]["impervious"]
    assert imp["iou"] is None and imp["precision"] is None and imp["recall"] is None
    assert m["mean_iou"] == pytest.approx((5 / 9 + 8 / 13 + 6 / 10) / 3)
    json.dumps(m, allow_nan=False)  # None, not NaN: valid JSON


def test_all_predicted_no_data():
    cm = np.zeros((4, 5), dtype=np.int64)
    cm[:, 0] = [3, 4, 0, 0]
    m = compute_metrics(cm, NAMES)
    assert m["overall_accuracy"] == 0.0
    assert m["per_class"]["water"]["iou"] == 0.0 and m["per_class"]["water"]["precision"] is None
    assert m["mean_iou"] == 0.0  # water and tree count (present in the reference), the others are absent
    assert m["kappa"] == 0.0


def test_perfect_and_empty_matrices():
    perfect = compute_metrics(np.hstack([np.zeros((4, 1)), np.diag([5, 3, 2, 1])]).astype(int), NAMES)
    assert perfect["overall_accuracy"] == perfect["mean_iou"] == perfect["fw_iou"] == pytest.approx(1.0)
    assert perfect["kappa"] == pytest.approx(1.0)
    single = np.zeros((4, 5), dtype=int)
    single[1, 2] = 9
    assert compute_metrics(single, NAMES)["kappa"] is None  # expected agreement 1: undefined
    empty = compute_metrics(np.zeros((4, 5), dtype=int), NAMES)
    assert empty["overall_accuracy"] is None and empty["mean_iou"] is None and empty["kappa"] is None
    assert empty["legacy"]["oa_mean_recall"] is None


def test_bad_matrix_shapes():
    with pytest.raises(ValueError):
        compute_metrics(np.zeros((4, 4)), NAMES)
    with pytest.raises(ValueError):
        compute_metrics(-np.ones((4, 5)), NAMES)


def test_legacy_figures_as_published():
    legacy = compute_metrics(CM, NAMES)["legacy"]
    # "OA" = sum of recall over classes present in the reference / 4.
    assert legacy["oa_mean_recall"] == pytest.approx((5 / 8 + 8 / 10 + 6 / 10) / 4)
    # "mIoU" = sum of IoU over present classes / 4 (impervious absent from the reference: dropped).
    assert legacy["miou_sum_over_4"] == pytest.approx((5 / 9 + 8 / 13 + 6 / 11) / 4)
    assert legacy["kappa"] == pytest.approx(compute_metrics(CM, NAMES)["kappa"])
    assert legacy["per_class_iou"][0] is None and legacy["frequency"][0] == 0.0


def test_legacy_inflated_by_reference_class_zero():
    # The published script keeps GT 0 as a class: five present classes divided by 4 (defect 21).
    cm5 = np.diag([4, 1, 1, 1, 1])
    legacy = legacy_metrics(cm5)
    assert legacy["miou_sum_over_4"] == pytest.approx(5 / 4)
    assert legacy["oa_mean_recall"] == pytest.approx(5 / 4)
    assert legacy["fw_iou"] == pytest.approx(1.0)
    assert square_matrix(CM).shape == (5, 5) and square_matrix(CM)[0].sum() == 0
    with pytest.raises(ValueError):
        legacy_metrics(CM)


def test_confusion_from_arrays_excludes_reference_nodata_and_counts_predicted_zero():
    ref = np.array([[0, 1, 1], [2, 2, 4]])
    pred = np.array([[3, 1, 0], [2, 4, 4]])
    cm = confusion_from_arrays(ref, pred, 4)
    expected = np.zeros((4, 5), dtype=int)
    expected[0, 1] = expected[0, 0] = 1  # water: one right, one predicted 0
    expected[1, 2] = expected[1, 4] = 1
    expected[3, 4] = 1
    np.testing.assert_array_equal(cm, expected)  # the ref-0 pixel (predicted 3) is not counted
    with pytest.raises(ValueError):
        confusion_from_arrays(ref, pred[:, :2], 4)


@pytest.fixture(scope="module")
def chesapeake():
    return load_dataset("Chesapeake")


# NLCD 2011 code -> class (1 water, 2 tree canopy, 3 low vegetation, 4 impervious), written out by hand.
NLCD_TO_CLASS = {
    11: 1,
    12: 3, 21: 3, 31: 3, 71: 3, 72: 3, 73: 3, 74: 3, 81: 3, 82: 3, 95: 3,
    22: 4, 23: 4, 24: 4,
    41: 2, 42: 2, 43: 2, 51: 2, 52: 2, 90: 2,
}
CCLC_TO_CLASS = {1: 1, 2: 2, 3: 3, 4: 4, 5: 4, 6: 4, 15: 0}  # docs/design.md §8.1


@pytest.mark.parametrize("name", ["Chesapeake", "sample"])
def test_chesapeake_label_tables_exactly(name):
    dataset = load_dataset(name)
    assert dict(dataset.lr_label.lookup) == NLCD_TO_CLASS
    assert tuple(dataset.lr_label.nodata) == (0,)
    assert dict(dataset.hr_label.lookup) == CCLC_TO_CLASS
    assert tuple(dataset.hr_label.nodata) == (0, 15)
    assert dataset.class_names == ("no data", "water", "tree canopy", "low vegetation", "impervious")


def _pair(tmp_path, ref, pred, name="t", ref_kw=None, pred_kw=None):
    ref_path = write_geotiff(str(tmp_path / f"{name}_lc.tif"), ref.astype(np.uint8), **(ref_kw or {}))
    pred_path = write_geotiff(str(tmp_path / f"{name}_pred.tif"), pred.astype(np.uint8), **(pred_kw or {}))
    return pred_path, ref_path


def test_confusion_for_pair_maps_cclc_codes_and_streams_by_windows(tmp_path, chesapeake):
    rng = np.random.default_rng(0)
    ref = rng.choice([0, 1, 2, 3, 4, 5, 6, 15], size=(37, 23))
    pred = rng.integers(0, 5, size=(37, 23))
    pred_path, ref_path = _pair(tmp_path, ref, pred)
    lookup = {0: 0, 15: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 4, 6: 4}  # docs/design.md §8.1
    expected = np.zeros((4, 5), dtype=np.int64)
    for r, p in zip(ref.ravel(), pred.ravel()):
        if lookup[r]:
            expected[lookup[r] - 1, p] += 1
    for window_pixels in (23 * 5, 10**6):  # 5 rows per window (uneven last window), or one window
        np.testing.assert_array_equal(confusion_for_pair(pred_path, ref_path, chesapeake, window_pixels), expected)


def test_real_reference_against_nlcd_baseline(tmp_path, chesapeake):
    """Score the real NLCD tile (mapped to classes) as a 'prediction' of the real CCLC tile."""
    lc_path = os.path.join(GEOREF_DIR, "m_3907833_nw_17_1_lc.tif")
    with rasterio.open(os.path.join(GEOREF_DIR, "m_3907833_nw_17_1_nlcd.tif")) as src:
        nlcd, profile = src.read(1), src.profile
    with rasterio.open(lc_path) as src:
        lc = src.read(1)
    pred = chesapeake.lr_label.map(nlcd)
    pred_path = write_geotiff(str(tmp_path / "nlcd_pred.tif"), pred, crs=profile["crs"], transform=profile["transform"])
    cm = confusion_for_pair(pred_path, lc_path, chesapeake, window_pixels=260 * 31)
    ref = chesapeake.hr_label.map(lc)
    expected = np.zeros((4, 5), dtype=np.int64)
    np.add.at(expected, (ref[ref > 0] - 1, pred[ref > 0]), 1)
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == lc.size  # this tile has no reference no-data
    # Computed once from the real tile pair with the tables above; NLCD codes in this tile:
    # 11, 21, 22, 23, 24, 31, 41, 42, 43, 52, 71, 81, 82. Rows: CCLC water, tree, low vegetation,
    # impervious; columns: predicted no data, water, tree, low vegetation, impervious.
    pinned = [[0, 574, 148, 60, 28],
              [0, 602, 47559, 4239, 1077],
              [0, 111, 3461, 5230, 1298],
              [0, 11, 317, 817, 2068]]
    assert cm.tolist() == pinned
    m = compute_metrics(cm, chesapeake.eval_names)
    assert m["overall_accuracy"] == pytest.approx(55431 / 67600, rel=1e-12)  # 0.81999
    iou = [574 / (810 + 1298 - 574), 47559 / (53477 + 51485 - 47559), 5230 / (10100 + 10346 - 5230),
           2068 / (3213 + 4471 - 2068)]
    assert [c["iou"] for c in m["per_class"].values()] == pytest.approx(iou, rel=1e-12)
    assert m["mean_iou"] == pytest.approx(0.47866164999970584, rel=1e-12)
    assert m["mean_iou"] == pytest.approx(sum(iou) / 4, rel=1e-12)


def test_prediction_to_eval_for_sixteen_class_models(tmp_path):
    nlcd16 = load_dataset("Chesapeake_NLCD16")
    ref = np.array([[2, 2, 3, 1]])
    pred = np.array([[8, 1, 2, 1]])  # deciduous -> tree, open water -> water (wrong), ice -> low veg, water
    pred_path, ref_path = _pair(tmp_path, ref, pred)
    cm = confusion_for_pair(pred_path, ref_path, nlcd16)
    expected = np.zeros((4, 5), dtype=np.int64)
    expected[1, 2] = expected[1, 1] = expected[2, 3] = expected[0, 1] = 1
    np.testing.assert_array_equal(cm, expected)


@pytest.mark.parametrize("change, message", [
    (dict(pred=np.zeros((5, 6))), "size"),
    (dict(pred_kw=dict(crs="EPSG:26918")), "CRS"),
    (dict(pred_kw=dict(transform=from_origin(500001.0, 4400000.0, 1.0, 1.0))), "transform"),
    (dict(ref=np.full((5, 5), 9)), "label codes [9]"),
    (dict(pred=np.full((5, 5), 7)), "predicted values [7]"),
])
def test_pair_errors_name_the_file(tmp_path, chesapeake, change, message):
    args = dict(ref=np.ones((5, 5)), pred=np.ones((5, 5)))
    args.update(change)
    pred_path, ref_path = _pair(tmp_path, **args)
    with pytest.raises(InputError, match=r".*\.tif.*") as info:
        confusion_for_pair(pred_path, ref_path, chesapeake)
    assert message in str(info.value)


def test_missing_and_corrupt_files(tmp_path, chesapeake):
    pred_path, ref_path = _pair(tmp_path, np.ones((4, 4)), np.ones((4, 4)))
    with pytest.raises(InputError, match="prediction not found"):
        confusion_for_pair(str(tmp_path / "nope.tif"), ref_path, chesapeake)
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(InputError, match="corrupt.tif"):
        confusion_for_pair(str(corrupt), ref_path, chesapeake)


def test_evaluate_pairs_sums_tiles(tmp_path, chesapeake):
    a = _pair(tmp_path, np.array([[1, 2], [3, 5]]), np.array([[1, 2], [3, 4]]), name="a")
    b = _pair(tmp_path, np.array([[1, 15]]), np.array([[0, 3]]), name="b")
    result = evaluate_pairs([a, b], chesapeake)
    assert result["valid_pixels"] == 5 and result["overall_accuracy"] == pytest.approx(4 / 5)
    assert [t["valid_pixels"] for t in result["tiles"]] == [4, 1]
    assert result["tiles"][1]["overall_accuracy"] == 0.0
    text = format_report(result)
    assert "legacy" in text and "mIoU" in text and "water" in text


def test_pair_predictions_and_summary(tmp_path, chesapeake):
    from dataset import TileEntry

    entry = TileEntry(str(tmp_path / "x_naip-new.tif"), None, str(tmp_path / "x_lc.tif"))
    with pytest.raises(InputError, match="x_predictions-new.tif: prediction not found"):
        pair_predictions([entry], str(tmp_path))
    with pytest.raises(InputError, match="no hr_label_fn"):
        pair_predictions([TileEntry(entry.image)], str(tmp_path))
    result = evaluate_pairs([_pair(tmp_path, np.ones((2, 2)), np.ones((2, 2)))], chesapeake)
    summary = tmp_path / "summary.csv"
    append_summary(str(summary), result, "epoch_1")
    append_summary(str(summary), result, "epoch_2")
    lines = summary.read_text().splitlines()
    assert lines[0].startswith("checkpoint,tiles,valid_pixels,overall_accuracy,mean_iou,fw_iou,kappa,iou_water")
    assert [line.split(",")[0] for line in lines[1:]] == ["epoch_1", "epoch_2"]
    summary.write_text("other,columns\n")
    with pytest.raises(InputError, match="existing summary"):
        append_summary(str(summary), result, "epoch_3")
