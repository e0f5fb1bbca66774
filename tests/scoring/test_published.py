"""``mIoU.py --protocol published``: the published evaluation reproduced exactly (design §8.2), on a
small constructed case whose published figures are worked out by hand below."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mIoU
from mapping.writer import output_name
from scoring.metrics import published_confusion
from tests.helpers import run_main, write_geotiff, write_list

# Tile A: reference 5 and 15 lie outside 0..4 and are dropped; reference 0 is kept as a class.
REF_A = [[1, 1, 2, 2], [0, 3, 5, 15]]
PRED_A = [[1, 2, 2, 2], [1, 3, 4, 0]]
# Tile B: the predicted 5 counts as 4.
REF_B = [[4, 4, 3, 3], [2, 0, 1, 4]]
PRED_B = [[4, 5, 3, 1], [0, 0, 1, 3]]
# Rows reference 0..4, columns prediction 0..4, A + B counted by hand pixel by pixel.
HAND_MATRIX = [
    [1, 1, 0, 0, 0],
    [0, 2, 1, 0, 0],
    [1, 0, 2, 0, 0],
    [0, 1, 0, 2, 0],
    [0, 0, 0, 1, 2],
]
# 14 pixels; row sums 2, 3, 3, 3, 3; column sums 2, 4, 3, 3, 2; diagonal 1, 2, 2, 2, 2.
HAND_IOU = [1 / 3, 2 / 5, 2 / 4, 2 / 4, 2 / 3]        # TP / (row + column - TP)
HAND_OA = (1 / 2 + 4 * (2 / 3)) / 4                  # "OA": sum of per-class recall / 4 = 19/24
HAND_MIOU = sum(HAND_IOU) / 4                        # "mIoU": five present classes, divided by 4 = 0.6
HAND_FWIOU = 2 / 14 * (1 / 3) + 3 / 14 * (2 / 5 + 1 / 2 + 1 / 2 + 2 / 3)  # = 103/210
HAND_KAPPA = (9 / 14 - 40 / 196) / (1 - 40 / 196)    # expected agreement (2*2+3*4+3*3+3*3+3*2)/14^2; = 43/78


@pytest.fixture
def published_case(tmp_path):
    """Five tiles: A and B scored, C skipped (its prediction has fewer pixels), D and E the last two
    pairs of the list, which the published loop never reaches (all wrong, so scoring them shows)."""
    maps = {"A": (REF_A, PRED_A), "B": (REF_B, PRED_B), "C": ([[1, 1, 1, 1]] * 2, [[2, 2, 2]] * 2),
            "D": ([[1, 2, 3, 4]] * 2, [[4, 3, 2, 1]] * 2), "E": ([[2] * 4] * 2, [[1] * 4] * 2)}
    rows = []
    for tile, (ref, pred) in maps.items():
        image = write_geotiff(str(tmp_path / "tiles" / f"{tile}_naip-new.tif"), np.ones((1, 2, 4), np.uint8))
        write_geotiff(str(tmp_path / "maps" / output_name(image)), np.array(pred, np.uint8))
        rows.append((image, "", write_geotiff(str(tmp_path / "ref" / f"{tile}_lc.tif"), np.array(ref, np.uint8))))
    return write_list(tmp_path / "eval.csv", rows), str(tmp_path / "maps")


def test_published_evaluation_matches_the_hand_computed_figures(tmp_path, published_case, capsys):
    eval_list, maps = published_case
    out = tmp_path / "published.json"
    code, stdout, _ = run_main(mIoU.main, ["--pred_dir", maps, "--list_dir", eval_list, "--dataset", "Chesapeake",
                                           "--protocol", "published", "--json", out], capsys)
    assert code == 0
    result = json.loads(out.read_text())
    assert result["confusion_matrix"]["counts"] == HAND_MATRIX
    assert result["oa_mean_recall"] == pytest.approx(HAND_OA) == pytest.approx(19 / 24)
    assert result["miou_sum_over_4"] == pytest.approx(HAND_MIOU) == pytest.approx(0.6)
    assert result["fw_iou"] == pytest.approx(HAND_FWIOU) == pytest.approx(103 / 210)
    assert result["kappa"] == pytest.approx(HAND_KAPPA) == pytest.approx(43 / 78)
    assert result["per_class_iou"] == pytest.approx(HAND_IOU)
    assert result["frequency"] == pytest.approx([2 / 14] + [3 / 14] * 4)
    assert result["counted_pixels"] == 14 and result["dropped_reference_pixels"] == 2
    assert [p.split("/")[-1] for p in result["not_scored_as_published"]] == ["D_predictions-new.tif",
                                                                            "E_predictions-new.tif"]
    assert [p.split("/")[-1] for p in result["skipped_pixel_count_differs"]] == ["C_predictions-new.tif"]
    assert "published evaluation" in stdout and "'mIoU' (sum of IoU / 4) 0.6000" in stdout
    assert "'OA' (sum of recall / 4) 0.7917" in stdout and "2 reference pixels outside 0..4" in stdout
    # the corrected protocol scores the same maps otherwise (all five tiles, no reference 0 row)
    code, stdout, _ = run_main(mIoU.main, ["--pred_dir", maps, "--list_dir", eval_list, "--dataset", "Chesapeake",
                                           "--quiet"], capsys)
    assert code == 2  # it refuses tile C, whose sizes differ, where the published script skipped it


def test_reference_mapped_through_the_hr_table(tmp_path, published_case, capsys):
    """hr_table: CCLC 5 -> 4 and 15 -> 0 before the published filters, so tile A adds (4, 4) and (0, 0)."""
    eval_list, maps = published_case
    out = tmp_path / "mapped.json"
    code, _, _ = run_main(mIoU.main, ["--pred_dir", maps, "--list_dir", eval_list, "--dataset", "Chesapeake",
                                      "--protocol", "published", "--published_reference", "hr_table", "--json", out],
                          capsys)
    assert code == 0
    expected = np.array(HAND_MATRIX)
    expected[4, 4] += 1
    expected[0, 0] += 1
    result = json.loads(out.read_text())
    assert result["confusion_matrix"]["counts"] == expected.tolist() and result["dropped_reference_pixels"] == 0


def test_published_matrix_of_arrays_and_its_limits():
    cm, dropped = published_confusion(np.array(REF_A), np.array(PRED_A))
    assert cm.sum() == 6 and dropped == 2 and cm[0, 1] == 1  # reference 0 is a row of the matrix
    with pytest.raises(Exception, match="outside the published evaluation's 0..5"):
        published_confusion(np.array([[1]]), np.array([[6]]))


def test_published_protocol_writes_no_summary_row(tmp_path, published_case, capsys):
    eval_list, maps = published_case
    code, _, err = run_main(mIoU.main, ["--pred_dir", maps, "--list_dir", eval_list, "--protocol", "published",
                                        "--summary_csv", tmp_path / "s.csv"], capsys)
    assert code == 2 and "--protocol published" in err


def test_shipped_evaluation_list_leaves_out_the_published_two():
    """With the shipped 21-tile list, the published protocol scores the paper's 19 tiles."""
    from dataset import load_dataset
    from dataset.lists import read_dataset_list
    from tests.helpers import REPO_ROOT

    _, entries = read_dataset_list(load_dataset("Chesapeake"), f"{REPO_ROOT}/dataset/CSV_list/Chesapeake_NewYork_eval.csv",
                                   required=("image_fn", "hr_label_fn"), check_exists=False)
    tiles = [entry.stem.replace("_naip-new", "") for entry in entries]
    assert len(tiles) == 21 and tiles[-2:] == ["m_4207556_nw_18_1", "m_4307417_sw_18_1"]
