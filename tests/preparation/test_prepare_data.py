"""`prepare_data.py list / stats / check`, the OpenEarthMap definitions and definition files that extend others."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from dataset import load_dataset, read_list
from dataset.errors import InputError, run_cli
from preparation.lists import random_split, spatial_split, tile_bounds
from preparation.statistics import RunningMoments, band_statistics
from tests.helpers import GEOREF_DIR, write_geotiff
from tools.prepare_data import main

NAIP = os.path.join(GEOREF_DIR, "m_3907833_nw_17_1_naip-new.tif")
NLCD = os.path.join(GEOREF_DIR, "m_3907833_nw_17_1_nlcd.tif")

# Published legends (codes) of the LR products; each must be in its table.
LEGENDS = {
    "OpenEarthMap_ESA_WorldCover": [10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100],
    "OpenEarthMap_ESRI_GLC10": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    # The 35 fine classes of GLC_FCS30D, plus the level-1 codes 50, 60, 70, 80, 90, 180 of GLC_FCS30 2015/2020.
    "OpenEarthMap_GLC_FCS30": [10, 11, 12, 20, 50, 51, 52, 60, 61, 62, 70, 71, 72, 80, 81, 82, 90, 91, 92, 120, 121,
                               122, 130, 140, 150, 152, 153, 180, 181, 182, 183, 184, 185, 186, 187, 190, 200, 201,
                               202, 210, 220],
    "OpenEarthMap_GlobeLand30": [10, 20, 30, 40, 50, 60, 70, 80, 90, 100],
}
NODATA = {"OpenEarthMap_ESA_WorldCover": [0], "OpenEarthMap_ESRI_GLC10": [0], "OpenEarthMap_GLC_FCS30": [0, 250],
          "OpenEarthMap_GlobeLand30": [0, 255]}
OEM = ["no data", "bareland", "rangeland", "developed space", "road", "tree", "water", "agriculture land", "building"]


def cli(capsys, *argv):
    """Run the CLI as a user would: (exit status, stdout, stderr)."""
    code = run_cli(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------
# Definitions


@pytest.mark.parametrize("name", sorted(LEGENDS))
def test_openearthmap_definitions_cover_the_published_legends(name):
    d = load_dataset(name)
    assert d.bands == ("red", "green", "blue") and list(d.class_names) == OEM
    table = d.lr_label
    assert sorted(set(table.lookup) - {0}) == LEGENDS[name] and list(table.nodata) == NODATA[name]
    mapped = table.map(np.array(LEGENDS[name] + NODATA[name]), source=name)
    assert set(mapped) == set(range(9)) - {3, 4}  # built-up goes to building; no road, no developed space
    for code in LEGENDS[name]:
        assert f"{code} " in table.notes  # every code is explained in the notes
    assert "building" in table.notes and "road" in table.notes  # what the built-up mapping means
    assert d.hr_label.map(np.arange(9), source="hr").tolist() == list(range(9))
    with pytest.raises(InputError, match=r"label codes \[254\] are not in the"):
        table.map(np.array([254]))


def test_a_custom_definition_file_extends_a_shipped_one(tmp_path):
    custom = tmp_path / "defs" / "my_area.json"
    custom.parent.mkdir()
    custom.write_text(json.dumps({"extends": "OpenEarthMap_ESA_WorldCover", "name": "my_area",
                                  "mean": [90.0, 95.0, 85.0], "std": [40.0, 38.0, 36.0]}))
    d = load_dataset(str(custom))
    assert d.name == "my_area" and d.mean == (90.0, 95.0, 85.0)
    assert d.lr_label.lookup == load_dataset("OpenEarthMap_ESA_WorldCover").lr_label.lookup
    child = tmp_path / "defs" / "child.json"
    child.write_text(json.dumps({"extends": "my_area.json", "name": "child"}))  # relative to the file
    assert load_dataset(str(child)).mean == (90.0, 95.0, 85.0)
    custom.write_text(json.dumps({"extends": "child.json", "name": "loop"}))
    with pytest.raises(InputError, match="loops back"):
        load_dataset(str(child))


# ----------------------------------------------------------------------------------------------
# list


def make_tiles(folder, grid=(3, 3), size=20, res=10.0, bands=4, gap=0.0):
    """A grid of adjacent georeferenced tiles ``t_<row>_<col>_img.tif`` with ``..._lab.tif`` labels."""
    paths = []
    for r in range(grid[0]):
        for c in range(grid[1]):
            transform = from_origin(500000 + c * (size * res + gap), 4000000 - r * (size * res + gap), res, res)
            img = np.full((bands, size, size), 10 + r + c, dtype=np.uint8)
            paths.append(write_geotiff(os.path.join(folder, "img", f"t_{r}_{c}_img.tif"), img, transform=transform))
            write_geotiff(os.path.join(folder, "lab", f"t_{r}_{c}_lab.tif"), np.full((size, size), 41, np.uint8),
                          transform=transform)
    return paths


def test_list_pairs_images_and_labels_through_patterns(tmp_path, capsys):
    make_tiles(str(tmp_path), grid=(1, 3))
    out = tmp_path / "lists" / "area.csv"
    code, stdout, _ = cli(capsys, "list", "--images", str(tmp_path / "img" / "*.tif"),
                          "--labels", str(tmp_path / "lab" / "{key}_lab.tif"), "--strip", "_img", "--out", str(out))
    assert code == 0 and "3 tiles" in stdout
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["image_fn", "label_fn"] and rows[1][0].startswith("../img/")  # relative to the CSV
    entries = read_list(str(out))
    assert [os.path.basename(e.label) for e in entries] == ["t_0_0_lab.tif", "t_0_1_lab.tif", "t_0_2_lab.tif"]


def test_list_reports_a_missing_label_or_skips_it(tmp_path, capsys):
    make_tiles(str(tmp_path), grid=(1, 2))
    os.remove(tmp_path / "lab" / "t_0_1_lab.tif")
    args = ["list", "--images", str(tmp_path / "img" / "*.tif"), "--labels", str(tmp_path / "lab" / "{key}_lab.tif"),
            "--strip", "_img", "--out", str(tmp_path / "a.csv")]
    code, _, err = cli(capsys, *args)
    assert code == 2 and "t_0_1_lab.tif: no such label" in err and not (tmp_path / "a.csv").exists()
    code, out, _ = cli(capsys, *args, "--skip_missing")
    assert code == 0 and "skipped" in out and len(read_list(str(tmp_path / "a.csv"))) == 1
    code, _, err = cli(capsys, "list", "--images", str(tmp_path / "img" / "*.tif"), "--labels", "{tile}.tif",
                       "--out", str(tmp_path / "b.csv"))
    assert code == 2 and "unknown placeholder {tile}" in err


def test_random_split_is_seeded_disjoint_and_complete():
    train, val = random_split(10, 0.3, seed=5)
    assert len(val) == 3 and sorted(train + val) == list(range(10))
    assert random_split(10, 0.3, seed=5) == (train, val) and random_split(10, 0.3, seed=6) != (train, val)
    with pytest.raises(InputError):
        random_split(1, 0.3)


def test_spatial_split_keeps_train_and_val_apart(tmp_path, capsys):
    paths = make_tiles(str(tmp_path), grid=(6, 6))  # 36 adjacent 200 m tiles
    bounds = tile_bounds(paths)
    train, val, dropped = spatial_split(bounds, 0.2, seed=0, block=400.0)
    assert sorted(train + val + dropped) == list(range(36)) and 7 <= len(val) <= 12 and dropped
    for i in train:
        for j in val:
            a, b = bounds[i], bounds[j]
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (paths[i], paths[j])
    code, out, _ = cli(capsys, "list", "--images", str(tmp_path / "img" / "*.tif"),
                       "--labels", str(tmp_path / "lab" / "{key}_lab.tif"), "--strip", "_img",
                       "--out", str(tmp_path / "s.csv"), "--split", "spatial", "--block_size", "400")
    assert code == 0 and "touch a val tile" in out
    n_train, n_val = (len(read_list(str(tmp_path / f"s_{p}.csv"))) for p in ("train", "val"))
    assert (n_train, n_val) == (len(train), len(val))


def test_spatial_split_needs_georeferenced_tiles(sample_list):
    images = [e.image for e in read_list(sample_list)]
    with pytest.raises(InputError, match="no CRS.*--split random"):
        tile_bounds(images)


# ----------------------------------------------------------------------------------------------
# stats


def test_running_moments_match_numpy_whatever_the_chunks():
    rng = np.random.default_rng(0)
    data = rng.normal(100, 30, (3, 5000))
    m = RunningMoments(3)
    for chunk in np.array_split(data, [7, 1000, 1001, 4000], axis=1):
        m.add(chunk)
    assert np.allclose(m.mean, data.mean(axis=1)) and np.allclose(m.std, data.std(axis=1))


def stats_tiles(folder, bands=3):
    rng = np.random.default_rng(1)
    images, values = [], []
    for i in range(3):
        img = rng.integers(1, 255, (bands, 50, 70), dtype=np.uint8)
        img[:, :10] = 0  # a no-data strip: all bands zero, left out
        img[1, 20:, :] = 0  # a zero in one band only is a real value
        images.append(write_geotiff(os.path.join(folder, f"s{i}.tif"), img))
        write_geotiff(os.path.join(folder, f"s{i}_lab.tif"), np.full((50, 70), 5, np.uint8))
        values.append(img[:, 10:].reshape(bands, -1))
    with open(os.path.join(folder, "list.csv"), "w") as fh:
        fh.write("image_fn,label_fn\n" + "".join(f"s{i}.tif,s{i}_lab.tif\n" for i in range(3)))
    return os.path.join(folder, "list.csv"), np.concatenate(values, axis=1).astype(np.float64)


def test_stats_writes_mean_and_std_of_valid_pixels_into_a_definition(tmp_path, capsys):
    csv_path, values = stats_tiles(str(tmp_path))
    out = tmp_path / "tokyo.json"
    code, stdout, _ = cli(capsys, "stats", "--list_dir", csv_path, "--base", "OpenEarthMap_ESA_WorldCover",
                          "--out", str(out))
    assert code == 0 and f"{values.shape[1]} valid pixels" in stdout
    d = load_dataset(str(out))
    assert d.name == "tokyo" and d.lr_label.product.startswith("ESA WorldCover")
    assert np.allclose(d.mean, values.mean(axis=1), atol=1e-3) and np.allclose(d.std, values.std(axis=1), atol=1e-3)
    # An existing file keeps everything but mean/std ("extends" included).
    out.write_text(json.dumps({"extends": "OpenEarthMap_GlobeLand30", "name": "mine"}))
    assert cli(capsys, "stats", "--list_dir", csv_path, "--out", str(out), "--windows", "2", "--size", "32")[0] == 0
    data = json.loads(out.read_text())
    assert data["extends"] == "OpenEarthMap_GlobeLand30" and len(data["mean"]) == 3


def test_stats_leave_out_pixels_at_the_declared_nodata_in_every_band(tmp_path):
    """As training does: all-zero pixels, and pixels at the image's declared nodata value (NaN too) in every band."""
    rng = np.random.default_rng(0)
    for fill in (255.0, np.nan):
        image = rng.uniform(10, 200, (3, 40, 40)).astype(np.float32)
        image[:, :10] = fill
        image[:, 10:12] = 0
        image[1, 12:14] = fill  # one band only: valid
        path = write_geotiff(str(tmp_path / f"tile_{fill}.tif"), image, nodata=fill)
        moments = band_statistics([path], windows=1, size=40)
        valid = image[:, 12:].reshape(3, -1)
        assert moments.count == valid.shape[1]
        if fill == 255.0:
            assert np.allclose(moments.mean, valid.mean(axis=1), rtol=1e-4)


def test_stats_rejects_a_band_mismatch_before_writing(tmp_path, capsys):
    csv_path, _ = stats_tiles(str(tmp_path), bands=3)
    out = tmp_path / "x.json"
    code, _, err = cli(capsys, "stats", "--list_dir", csv_path, "--base", "Chesapeake", "--out", str(out))
    assert code == 2 and "s0.tif: image has 3 bands, the dataset definition expects 4" in err
    assert not out.exists()
    code, _, err = cli(capsys, "stats", "--list_dir", csv_path, "--out", str(out))
    assert code == 2 and "give --base" in err


# ----------------------------------------------------------------------------------------------
# check


def check_case(folder, fault=None):
    """A two-tile list for the sample definition (4 bands, NLCD codes), with one ``fault``."""
    grid = dict(transform=from_origin(500000, 4000000, 1, 1))
    rows = []
    for i in range(2):
        image = np.full((4, 256, 256), 80, np.uint8)
        label = np.full((256, 256), 41, np.uint8)
        label[:16] = 0
        kw = dict(grid)
        if i == 1 and fault == "bands":
            image = image[:3]
        if i == 1 and fault == "codes":
            label[5, 5] = 77
        if i == 1 and fault == "nodata":
            label[:200] = 0
        img = write_geotiff(os.path.join(folder, f"t{i}.tif"), image, **grid)
        if i == 1 and fault == "size":
            label = label[:, :200]
        if i == 1 and fault == "crs":
            kw["crs"] = "EPSG:32618"
        lab = write_geotiff(os.path.join(folder, f"t{i}_lab.tif"), label, **kw)
        if i == 1 and fault == "missing":
            os.remove(lab)
        rows.append(f"{os.path.basename(img)},{os.path.basename(lab)}\n")
    path = os.path.join(folder, "list.csv")
    with open(path, "w") as fh:
        fh.write("image_fn,label_fn\n" + "".join(rows))
    return path


def test_check_passes_a_clean_list_with_a_summary(tmp_path, capsys):
    code, out, _ = cli(capsys, "check", "--list_dir", check_case(str(tmp_path)), "--dataset", "sample", "--verbose")
    assert code == 0
    assert "checked 2 tiles: 0 errors, 0 warnings; label nodata 6.2% on average" in out
    assert "t1.tif: label 6.2% no data" in out


@pytest.mark.parametrize("fault, message", [
    ("bands", "t1.tif: image has 3 bands, the dataset definition expects 4"),
    ("codes", "t1_lab.tif: label codes [77] are not in the"),
    ("size", "t1_lab.tif: size 200x256 differs from"),
    ("crs", "t1_lab.tif: CRS EPSG:32618 differs from"),
    ("missing", "t1_lab.tif: label not found"),
])
def test_check_names_each_problem_and_exits_1(tmp_path, capsys, fault, message):
    code, out, _ = cli(capsys, "check", "--list_dir", check_case(str(tmp_path), fault), "--dataset", "sample")
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and message in errors[0]
    assert "checked 2 tiles: 1 errors" in out


def test_check_warns_about_mostly_empty_labels_without_failing(tmp_path, capsys):
    code, out, _ = cli(capsys, "check", "--list_dir", check_case(str(tmp_path), "nodata"), "--dataset", "sample")
    assert code == 0 and "warning: " in out and "t1_lab.tif: 78.1% of the label is no data" in out


def test_check_usage_errors_exit_2(tmp_path, capsys):
    code, _, err = cli(capsys, "check", "--list_dir", check_case(str(tmp_path)), "--dataset", "Nowhere")
    assert code == 2 and "unknown dataset 'Nowhere'" in err
    code, _, err = cli(capsys, "check", "--dataset", "OpenEarthMap")
    assert code == 2 and "has no default list" in err


def test_check_on_the_bundled_sample_with_its_hr_reference(capsys):
    code, out, _ = cli(capsys, "check", "--dataset", "sample", "--hr")
    assert code == 0 and "checked 8 tiles: 0 errors, 0 warnings" in out


@pytest.mark.parametrize("command", ["align", "list", "stats", "check"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# End to end on the real Chesapeake tile


def test_real_tile_from_lr_product_to_a_checked_training_list(tmp_path, capsys):
    """align (NLCD as the LR product) -> list (with the HR reference) -> stats -> check."""
    labels = tmp_path / "labels"
    assert cli(capsys, "align", "--lr", NLCD, "--images", NAIP, "--out_dir", str(labels))[0] == 0
    with rasterio.open(NLCD) as a, rasterio.open(labels / "m_3907833_nw_17_1_naip-new_lr.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))  # same grid: a pixel-exact copy
    lst = tmp_path / "area.csv"
    code, _, _ = cli(capsys, "list", "--images", NAIP, "--labels", str(labels / "{stem}_lr.tif"),
                     "--hr_labels", os.path.join(GEOREF_DIR, "{key}_lc.tif"), "--strip", "_naip-new", "--out", str(lst))
    assert code == 0
    definition = tmp_path / "area.json"
    assert cli(capsys, "stats", "--list_dir", str(lst), "--base", "Chesapeake", "--out", str(definition))[0] == 0
    code, out, _ = cli(capsys, "check", "--list_dir", str(lst), "--dataset", str(definition), "--hr")
    assert code == 0 and "checked 1 tiles: 0 errors, 0 warnings" in out
    entry = read_list(str(lst), required=("image_fn", "label_fn", "hr_label_fn"))[0]
    assert entry.image == NAIP and entry.hr_label.endswith("m_3907833_nw_17_1_lc.tif")
