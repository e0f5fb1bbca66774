"""Up-front list checks (dataset.checks): clean rows give no problem, faults give one-line problems."""

from __future__ import annotations

import numpy as np
from rasterio.transform import from_origin

from dataset import TileEntry, load_dataset, read_list
from dataset.checks import check_entries, check_entry, label_histogram
from dataset.raster_io import open_raster
from tests.helpers import GEOREF_DIR, SAMPLE_LIST, write_geotiff

SAMPLE = load_dataset("sample")


def test_sample_and_georeferenced_tile_are_clean():
    entries = read_list(SAMPLE_LIST)
    assert check_entries(entries, SAMPLE, check_hr=True) == []
    tile = TileEntry(f"{GEOREF_DIR}/m_3907833_nw_17_1_naip-new.tif", f"{GEOREF_DIR}/m_3907833_nw_17_1_nlcd.tif",
                     f"{GEOREF_DIR}/m_3907833_nw_17_1_lc.tif")
    assert check_entry(tile, load_dataset("Chesapeake"), check_hr=True) == []


def test_problems_name_the_file(tmp_path):
    image = write_geotiff(str(tmp_path / "img.tif"), np.ones((4, 40, 40), np.uint8))
    moved = write_geotiff(str(tmp_path / "moved.tif"), np.full((40, 40), 41, np.uint8),
                          transform=from_origin(0.0, 10.0, 1.0, 1.0))
    odd = write_geotiff(str(tmp_path / "odd.tif"), np.full((40, 40), 200, np.uint8))
    problems = check_entry(TileEntry(image, moved), SAMPLE)
    assert len(problems) == 1 and "moved.tif: transform" in problems[0]
    problems = check_entry(TileEntry(image, odd), SAMPLE)
    assert len(problems) == 1 and "odd.tif" in problems[0] and "[200]" in problems[0]
    assert check_entry(TileEntry(image, odd), SAMPLE, scan_codes=False) == []
    problems = check_entry(TileEntry(image, odd), SAMPLE, scan_codes=False, check_hr=True)
    assert problems == [f"{image}: no hr_label_fn given for this tile"]
    assert "not found" in check_entry(TileEntry(str(tmp_path / "none.tif"), odd), SAMPLE)[0]


def test_label_histogram_any_integer_type(tmp_path):
    values = np.array([[3, 3, 500], [7, 500, 500]], dtype=np.int16)
    path = write_geotiff(str(tmp_path / "wide.tif"), values)
    with open_raster(path) as src:
        codes, counts = label_histogram(src, strip_rows=1)
    assert codes.tolist() == [3, 7, 500] and counts.tolist() == [2, 1, 3]


# ---------------------------------------------------------------------------- LR class mixes

def test_lr_mixes_table_and_round_trip():
    from dataset import load_dataset

    sample = load_dataset("sample")
    table = sample.mix_table()
    assert table.shape == (96, 5) and np.allclose(table[table.sum(1) > 0].sum(1), 1)
    assert table[21].tolist() == [0, 0, np.float32(0.3), np.float32(0.6), np.float32(0.1)]
    assert table[0].sum() == 0  # no data: excluded from the mix loss
    assert sample.mix_table(with_mixes=False)[21].tolist() == [0, 0, 0, 1, 0]  # hard labels: the lookup class
    assert load_dataset(sample.to_dict()) == sample
    plain = load_dataset("Chesapeake_NLCD16")
    assert plain.lr_mixes is None and "lr_mixes" not in plain.to_dict()
    one_hot = plain.mix_table()  # codes without a mix get all of their lookup class
    assert np.all(one_hot[list(plain.lr_label.lookup)].sum(1) == [v > 0 for v in plain.lr_label.lookup.values()])


def test_bad_lr_mixes_are_one_line_errors():
    import pytest

    from dataset import load_dataset
    from dataset.errors import InputError

    data = load_dataset("sample").to_dict()
    for mixes, message in [({"21": {"tree canopy": 0.5}}, "sum to 1"),
                           ({"21": {"forest": 1.0}}, "sum to 1"),
                           ({"99": {"tree canopy": 1.0}}, "code 99"),
                           ({"21": {"tree canopy": -0.5, "impervious": 1.5}}, "non-negative")]:
        with pytest.raises(InputError, match=message):
            load_dataset({**data, "lr_mixes": mixes})
    with pytest.raises(InputError, match="'non_vegetated_class' 'roads' is not one of the classes"):
        load_dataset({**data, "non_vegetated_class": "roads"})
    assert load_dataset("sample").non_vegetated_class == "impervious"
    assert load_dataset("Chesapeake_published").non_vegetated_class == "impervious"  # from the definition it extends
    assert load_dataset("Chesapeake_NLCD16").non_vegetated_class is None
