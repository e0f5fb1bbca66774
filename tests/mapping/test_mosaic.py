"""tools/mosaic.py: a VRT of a folder of maps that opens as one raster, with seams decided by the maps'
positions (midlines between centres), never by the order of the files."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from dataset import load_dataset
from mapping.mosaic import core_windows, find_maps, read_maps, write_mosaic
from mapping.overviews import add_overviews
from mapping.writer import DATASET_TAG
from tests.helpers import REPO_ROOT, gdalinfo, run_main, write_geotiff

DATASET = load_dataset("sample")
_spec = importlib.util.spec_from_file_location("vcnet_tools_mosaic", os.path.join(REPO_ROOT, "tools", "mosaic.py"))
MOSAIC_PY = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(MOSAIC_PY)


def write_map(path, value, left, top, width=100, height=100, res=1.0, crs="EPSG:26917", pixels=None):
    """A class map as test.py writes it (uint8, nodata 0, colour table, class tags) filled with ``value``."""
    data = np.full((height, width), value, dtype=np.uint8) if pixels is None else pixels
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8", crs=crs,
                       transform=from_origin(left, top, res, res), nodata=0) as dst:
        dst.write(data, 1)
        dst.write_colormap(1, DATASET.colormap())
        dst.update_tags(**{DATASET_TAG: json.dumps(DATASET.to_dict()),
                           "CLASS_NAMES": json.dumps(list(DATASET.class_names)),
                           "VCNET_SOURCE_IMAGE": os.path.basename(path).replace("predictions", "naip")})
        dst.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(DATASET.class_names)})
    return str(path)


def read_vrt(path):
    with rasterio.open(path) as src:
        return src.read(1), src


def test_overlap_seam_is_the_midline_whatever_the_file_order(tmp_path):
    # A (class 1) spans x 0..100, B (class 2) x 60..160: centres 50 and 110, seam at 80.
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir(), second.mkdir()
    write_map(first / "a_predictions.tif", 1, 0, 100)
    write_map(first / "b_predictions.tif", 2, 60, 100)
    # The same maps under swapped names, so that the file order is reversed.
    write_map(second / "a_predictions.tif", 2, 60, 100)
    write_map(second / "b_predictions.tif", 1, 0, 100)
    results = []
    for folder in (first, second):
        for paths in (find_maps(str(folder)), find_maps(str(folder))[::-1]):
            summary = write_mosaic(paths, str(folder / "mosaic.vrt"))
            assert (summary.maps, summary.width, summary.height) == (2, 160, 100)
            pixels, _ = read_vrt(folder / "mosaic.vrt")
            results.append(pixels)
    expected = np.where(np.arange(160) < 80, 1, 2)[None].repeat(100, axis=0)
    for pixels in results:
        np.testing.assert_array_equal(pixels, expected)


def test_grid_overlaps_take_the_nearest_centre(tmp_path):
    # 2 x 2 maps of 100 x 100 overlapping by 20 pixels: on a regular grid the rule is "nearest centre".
    origins = {1: (0, 0), 2: (80, 0), 3: (0, -80), 4: (80, -80)}
    for value, (left, top) in origins.items():
        write_map(tmp_path / f"m{5 - value}_predictions.tif", value, left, top)
    write_mosaic(find_maps(str(tmp_path)), str(tmp_path / "mosaic.vrt"))
    pixels, _ = read_vrt(tmp_path / "mosaic.vrt")
    assert pixels.shape == (180, 180)
    x = np.arange(180) + 0.5
    y = -(np.arange(180) + 0.5)
    centres = {v: (left + 50, top - 50) for v, (left, top) in origins.items()}
    distance = np.stack([np.hypot(x[None] - cx, y[:, None] - cy) for cx, cy in centres.values()])
    expected = np.array(list(centres))[np.argmin(distance, axis=0)]
    np.testing.assert_array_equal(pixels, expected)


def test_irregular_layout_leaves_no_hole_and_ignores_file_order(tmp_path):
    # Neighbours shifted by a few pixels (projected quarter quads are not a perfect grid), one map
    # fully inside the others' overlap, and a map seen twice under two names.
    layout = {"e": (1, 0, 0, 100), "d": (2, 85, -6, 100), "c": (3, 4, -82, 100), "b": (4, 90, -88, 100),
              "a": (1, 70, -65, 40)}  # value, left, top, side
    for name, (value, left, top, side) in layout.items():
        write_map(tmp_path / f"{name}_predictions.tif", value, left, top, width=side, height=side)
    write_map(tmp_path / "z_predictions.tif", 3, 4, -82)  # the same tile as map 3, mapped twice
    paths = find_maps(str(tmp_path))
    arrays = []
    for order in (paths, paths[::-1], paths[2:] + paths[:2]):
        write_mosaic(order, str(tmp_path / "mosaic.vrt"))
        pixels, _ = read_vrt(tmp_path / "mosaic.vrt")
        arrays.append(pixels)
    for pixels in arrays[1:]:
        np.testing.assert_array_equal(pixels, arrays[0])
    # Every pixel that some map covers has a class: the cores leave no hole.
    covered = np.zeros_like(arrays[0], dtype=bool)
    maps = read_maps(paths)
    left = min(f.left for f in maps.footprints)
    top = max(f.top for f in maps.footprints)
    for f in maps.footprints:
        covered[int(top - f.top):int(top - f.bottom), int(f.left - left):int(f.right - left)] = True
    assert covered.sum() < covered.size  # the layout is irregular: some of the bounding box is empty
    assert (arrays[0][covered] > 0).all() and (arrays[0][~covered] == 0).all()
    # A map that lies inside its neighbours' overlap keeps its own core.
    assert core_windows(maps.footprints)[paths.index(str(tmp_path / "a_predictions.tif"))] is not None


def test_vrt_keeps_grid_nodata_colours_names_and_opens_after_a_move(tmp_path):
    maps = tmp_path / "run" / "maps"
    maps.mkdir(parents=True)
    write_map(maps / "a_predictions.tif", 2, 500000.0, 4400000.0, res=0.6)
    write_map(maps / "b_predictions.tif", 3, 500030.0, 4400000.0, res=0.6)
    write_geotiff(str(maps / "a_predictions_probs.tif"), np.zeros((5, 10, 10), dtype=np.uint8))  # not a class map
    summary = write_mosaic(find_maps(str(maps)), str(maps / "mosaic.vrt"))
    assert summary.maps == 2
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "run"), moved)
    vrt = moved / "maps" / "mosaic.vrt"
    with rasterio.open(vrt) as src, rasterio.open(moved / "maps" / "a_predictions.tif") as tile:
        assert src.crs == tile.crs and src.res == pytest.approx(tile.res)
        assert src.transform.almost_equals(tile.transform)
        assert src.nodata == 0 and src.colormap(1) == tile.colormap(1)
        assert json.loads(src.tags()["CLASS_NAMES"]) == list(DATASET.class_names)
        assert src.tags()[DATASET_TAG] == tile.tags()[DATASET_TAG]
        assert "VCNET_SOURCE_IMAGE" not in src.tags()  # a tag that differs between maps
        assert src.tags(1)["CLASS_2"] == "tree canopy"
        pixels = src.read(1)
    assert pixels.shape == (100, 150) and set(np.unique(pixels)) == {2, 3}
    band = gdalinfo(str(vrt))["bands"][0]
    assert band["categories"] == list(DATASET.class_names)
    assert band["colorInterpretation"] == "Palette" and band["noDataValue"] == 0


def test_cli_writes_the_mosaic_and_refuses_mixed_maps(tmp_path, capsys):
    write_map(tmp_path / "a_predictions.tif", 1, 0, 100)
    write_map(tmp_path / "b_predictions.tif", 2, 0, 100, crs="EPSG:26918")
    code, _, err = run_main(MOSAIC_PY.main, ["--pred_dir", tmp_path], capsys)
    assert code == 2 and "the maps are in 2 CRSs (EPSG:26917: 1 map, EPSG:26918: 1 map)" in err and "--crs" in err
    code, out, _ = run_main(MOSAIC_PY.main, ["--pred_dir", tmp_path, "--crs", "EPSG:26918",
                                             "--out", tmp_path / "utm18.vrt"], capsys)
    assert code == 0 and "utm18.vrt: 1 map, 100 x 100 pixels, EPSG:26918" in out
    assert (read_vrt(tmp_path / "utm18.vrt")[0] == 2).all()
    code, _, err = run_main(MOSAIC_PY.main, ["--pred_dir", tmp_path, "--crs", "EPSG:32618"], capsys)
    assert code == 2 and "--crs EPSG:32618: no map in this CRS (the maps are in EPSG:26917, EPSG:26918)" in err
    code, _, err = run_main(MOSAIC_PY.main, ["--pred_dir", tmp_path, "--crs", "not-a-crs"], capsys)
    assert code == 2 and "--crs not-a-crs: not a CRS" in err
    write_map(tmp_path / "c_predictions.tif", 1, 200, 100, res=0.5, width=20, height=20)
    code, _, err = run_main(MOSAIC_PY.main, ["--pred_dir", tmp_path, "--crs", "EPSG:26917"], capsys)
    assert code == 2 and "c_predictions.tif: pixel size 0.5 x 0.5 differs" in err
    os.remove(tmp_path / "c_predictions.tif")
    write_geotiff(str(tmp_path / "image.tif"), np.zeros((4, 8, 8), dtype=np.uint8))
    code, _, err = run_main(MOSAIC_PY.main, ["--pred_dir", tmp_path, "--crs", "EPSG:26917"], capsys)
    assert code == 2 and "image.tif: not a class map written by test.py" in err
    code, _, err = run_main(MOSAIC_PY.main, ["--pred_dir", tmp_path / "empty"], capsys)
    assert code == 2 and "empty: folder not found" in err
    assert not os.path.exists(tmp_path / "mosaic.vrt")


def test_zoomed_out_reads_go_through_each_maps_overviews(tmp_path):
    # Class 1 on the pixels that a nearest-neighbour reduction by 4 samples, 4 everywhere else.
    pixels = np.full((600, 600), 4, dtype=np.uint8)
    pixels[0::2, 0::2] = 1
    with_overviews = write_map(tmp_path / "a_predictions.tif", 0, 0, 600, width=600, height=600, pixels=pixels)
    write_map(tmp_path / "b_predictions.tif", 0, 600, 600, width=600, height=600, pixels=pixels)
    with rasterio.open(with_overviews, "r+") as dst:
        assert add_overviews(dst, min_size=512) == [2, 4]
    write_mosaic(find_maps(str(tmp_path)), str(tmp_path / "mosaic.vrt"))
    with rasterio.open(tmp_path / "mosaic.vrt") as src:
        zoomed_out = src.read(1, out_shape=(150, 300))
    assert (zoomed_out[:, :150] == 4).all()  # the mode overview of the map that has them
    assert (zoomed_out[:, 150:] == 1).all()  # the other map is decimated pixel by pixel
