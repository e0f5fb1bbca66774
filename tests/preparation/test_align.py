"""preparation/align.py and `prepare_data.py align`: LR products warped onto the exact grid of HR tiles.

Real data: the downsampled Chesapeake tile (NAIP + NLCD, EPSG:26917) and the two 0.6 m NAIP crops
(EPSG:26911, EPSG:26916). Generated rasters cover the fault cases.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import Resampling, calculate_default_transform, reproject, transform, transform_bounds

from dataset import load_dataset
from dataset.errors import InputError, run_cli
from preparation.align import LRProduct, align_tile, align_tiles, expand_lr_paths
from tests.helpers import GEOREF_DIR, write_geotiff
from tools.prepare_data import main

NAIP = os.path.join(GEOREF_DIR, "m_3907833_nw_17_1_naip-new.tif")
NLCD = os.path.join(GEOREF_DIR, "m_3907833_nw_17_1_nlcd.tif")
CROPS = [os.path.join(GEOREF_DIR, "m_3211605_ne_11_060_20200415.tif"),
         os.path.join(GEOREF_DIR, "m_4208701_ne_16_060_20200902.tif")]
WORLDCOVER = np.array([10, 20, 30, 40, 50, 60, 80, 90, 95, 100], dtype=np.uint8)


def warp_to(src_path, out_path, crs, resolution):
    """Nearest-neighbour copy of ``src_path`` in ``crs`` at ``resolution`` (what a user's LR product is)."""
    with rasterio.open(src_path) as src:
        dst_transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds,
                                                                   resolution=resolution)
        data = np.zeros((height, width), dtype=np.uint8)
        reproject(rasterio.band(src, 1), data, dst_transform=dst_transform, dst_crs=crs, dst_nodata=0,
                  resampling=Resampling.nearest)
    return write_geotiff(out_path, data, crs=crs, transform=dst_transform, nodata=0)


def read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.profile


def run_align(tmp_path, lr, image=NAIP, *extra):
    code = main(["align", "--lr", *([lr] if isinstance(lr, str) else lr), "--images", image,
                 "--out_dir", str(tmp_path / "out"), *extra])
    assert code == 0
    return str(tmp_path / "out" / (os.path.splitext(os.path.basename(image))[0] + "_lr.tif"))


@pytest.mark.parametrize("resolution, min_agreement", [(10.0, 0.999), (30.0, 0.95)])
def test_nlcd_round_trip_through_albers(tmp_path, resolution, min_agreement):
    """Chesapeake NLCD -> EPSG:5070 -> back onto the NAIP grid agrees with the original NLCD."""
    albers = warp_to(NLCD, str(tmp_path / "nlcd_5070.tif"), "EPSG:5070", resolution)
    out = run_align(tmp_path, albers)
    original, _ = read(NLCD)
    aligned, profile = read(out)
    with rasterio.open(NAIP) as naip:
        assert profile["crs"] == naip.crs and profile["transform"] == naip.transform
        assert (profile["width"], profile["height"]) == (naip.width, naip.height)
    assert profile["dtype"] == "uint8" and profile["nodata"] == 0 and profile["tiled"]
    assert profile["compress"] == "deflate"
    assert (aligned == original).mean() >= min_agreement
    # A label shifted by a few pixels agrees far less: the check above measures alignment.
    assert (aligned[:, 4:] == original[:, :-4]).mean() < 0.85


def lonlat_worldcover(tmp_path, image, res=1e-4, margin=5, name="wc.tif"):
    """A WorldCover-like EPSG:4326 raster around ``image`` whose codes follow the LR pixel index."""
    with rasterio.open(image) as src:
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    west, north = west - margin * res, north + margin * res
    cols = int(np.ceil((east - west) / res)) + margin
    rows = int(np.ceil((north - south) / res)) + margin
    r, c = np.mgrid[0:rows, 0:cols]
    codes = WORLDCOVER[(r * 7 + c * 3) % len(WORLDCOVER)]
    grid = from_origin(west, north, res, res)
    return write_geotiff(str(tmp_path / name), codes, crs="EPSG:4326", transform=grid, nodata=0), codes, grid


def expected_on(image, codes, grid):
    """The LR code under every pixel centre of ``image`` (computed independently of GDAL's warper)."""
    with rasterio.open(image) as src:
        rows, cols = np.mgrid[0:src.height, 0:src.width]
        xs, ys = src.transform @ (cols.ravel() + 0.5, rows.ravel() + 0.5)
        lon, lat = transform(src.crs, "EPSG:4326", xs, ys)
        shape = (src.height, src.width)
    c = np.floor((np.asarray(lon) - grid.c) / grid.a).astype(int)
    r = np.floor((np.asarray(lat) - grid.f) / grid.e).astype(int)
    return codes[r, c].reshape(shape)


@pytest.mark.parametrize("image", CROPS, ids=["california", "wisconsin"])
def test_worldcover_like_raster_onto_naip_crops(tmp_path, image, capsys):
    """A 10 m lon/lat raster lands on the 0.6 m UTM grid pixel for pixel, raw and class-mapped."""
    lr, codes, grid = lonlat_worldcover(tmp_path, image)
    expected = expected_on(image, codes, grid)
    out = run_align(tmp_path, lr, image)
    assert "100.0% of the tile covered by the LR product, 0.0% nodata" in capsys.readouterr().out
    aligned, profile = read(out)
    with rasterio.open(image) as src:
        assert (profile["crs"], profile["transform"], profile["width"], profile["height"]) == (
            src.crs, src.transform, src.width, src.height)
    assert (aligned == expected).mean() > 0.995
    mapped = run_align(tmp_path, lr, image, "--class_map", "OpenEarthMap_ESA_WorldCover")
    table = load_dataset("OpenEarthMap_ESA_WorldCover").lr_label.lut()
    assert np.array_equal(read(mapped)[0], table[aligned])


def synthetic_tile(tmp_path, name="tile.tif", size=(40, 60), res=2.0, crs="EPSG:32617"):
    """A 3-band image on a simple UTM grid (only its grid matters for align)."""
    image = np.ones((3, *size), dtype=np.uint8)
    return write_geotiff(str(tmp_path / name), image, crs=crs, transform=from_origin(500000, 4000000, res, res))


def test_partial_cover_and_lr_nodata_are_reported(tmp_path):
    tile = synthetic_tile(tmp_path)  # 60 x 40 px at 2 m: x 500000..500120
    lr = np.full((40, 30), 40, dtype=np.uint8)
    lr[:10] = 255  # the product's own nodata in the top quarter
    path = write_geotiff(str(tmp_path / "lr.tif"), lr, crs="EPSG:32617",
                         transform=from_origin(500000, 4000000, 2, 2), nodata=255)  # covers x < 500060
    with LRProduct([path]) as product:
        report = align_tile(tile, product, str(tmp_path / "out.tif"))
    assert report.covered == pytest.approx(0.5)
    assert report.nodata == pytest.approx(0.5 + 0.5 * 0.25)
    out, _ = read(report.output)
    assert set(np.unique(out[10:, :30])) == {40} and not out[:10].any() and not out[:, 30:].any()


def test_several_rasters_a_list_file_and_a_vrt_give_the_single_raster_result(tmp_path, monkeypatch):
    monkeypatch.setattr(LRProduct, "max_open", 1)  # rasters are reopened as the windows move
    albers = warp_to(NLCD, str(tmp_path / "nlcd_5070.tif"), "EPSG:5070", 30.0)
    data, profile = read(albers)
    half = data.shape[1] // 2
    left = write_geotiff(str(tmp_path / "parts" / "a.tif"), data[:, : half + 3], crs=profile["crs"],
                         transform=profile["transform"], nodata=0)
    right_transform = profile["transform"] @ rasterio.Affine.translation(half, 0)
    right = write_geotiff(str(tmp_path / "parts" / "b.tif"), data[:, half:], crs=profile["crs"],
                          transform=right_transform, nodata=0)
    listing = tmp_path / "parts.txt"
    listing.write_text("parts/a.tif\nparts/b.tif\n")
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text(mosaic_vrt(data.shape, profile, [(left, 0, half + 3), (right, half, data.shape[1] - half)]))
    single, _ = read(run_align(tmp_path / "single", albers, NAIP, "--window", "64"))
    for lr in ([left, right], str(listing), str(tmp_path / "parts" / "*.tif"), str(vrt)):
        assert np.array_equal(read(run_align(tmp_path / "multi", lr, NAIP, "--window", "64"))[0], single), lr


def mosaic_vrt(shape, profile, parts):
    """A hand-written GDAL VRT placing ``(file, x offset, width)`` parts side by side."""
    h, w = shape
    sources = "".join(
        f"<SimpleSource><SourceFilename relativeToVRT=\"0\">{path}</SourceFilename><SourceBand>1</SourceBand>"
        f"<SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{width}\" ySize=\"{h}\"/>"
        f"<DstRect xOff=\"{x}\" yOff=\"0\" xSize=\"{width}\" ySize=\"{h}\"/></SimpleSource>"
        for path, x, width in parts)
    gt = ", ".join(repr(v) for v in profile["transform"].to_gdal())
    return (f"<VRTDataset rasterXSize=\"{w}\" rasterYSize=\"{h}\"><SRS>{profile['crs'].to_wkt()}</SRS>"
            f"<GeoTransform>{gt}</GeoTransform><VRTRasterBand dataType=\"Byte\" band=\"1\">"
            f"<NoDataValue>0</NoDataValue>{sources}</VRTRasterBand></VRTDataset>")


def test_window_size_does_not_change_the_result(tmp_path):
    """Seams between windows leave no trace (only float ties on LR pixel borders may flip)."""
    lr, _, _ = lonlat_worldcover(tmp_path, CROPS[0], margin=-3)  # partial cover: nodata edges too
    small = align_tiles([CROPS[0]], [lr], str(tmp_path / "small"), window=48)[0]
    large = align_tiles([CROPS[0]], [lr], str(tmp_path / "large"), window=4096)[0]
    assert 0.2 < small.covered < 0.9
    assert np.count_nonzero(read(small.output)[0] != read(large.output)[0]) <= 3
    assert small.covered == pytest.approx(large.covered, abs=1e-4)


def test_mode_takes_the_majority_when_the_tile_is_coarser(tmp_path):
    # LR at 1 m; tile at 4 m over the same origin: each tile pixel covers 4 x 4 LR pixels.
    lr = np.full((16, 16), 30, dtype=np.uint8)
    lr[2::4, :] = 10  # one row in four, the one under each tile pixel's centre, is tree cover: a minority
    path = write_geotiff(str(tmp_path / "lr.tif"), lr, crs="EPSG:32617", transform=from_origin(500000, 4000000, 1, 1))
    tile = synthetic_tile(tmp_path, size=(4, 4), res=4.0)
    mode = align_tiles([tile], [path], str(tmp_path / "mode"), resampling="mode")[0]
    assert (read(mode.output)[0] == 30).all()
    nearest = align_tiles([tile], [path], str(tmp_path / "nearest"), resampling="nearest")[0]
    assert (read(nearest.output)[0] == 10).all()  # the centre sample: what mode is there to avoid


def test_uint16_codes_need_a_class_map(tmp_path):
    tile = synthetic_tile(tmp_path)
    lr = write_geotiff(str(tmp_path / "lr.tif"), np.full((40, 60), 300, dtype=np.uint16), crs="EPSG:32617",
                       transform=from_origin(500000, 4000000, 2, 2))
    definition = tmp_path / "map.json"
    definition.write_text('{"extends": "OpenEarthMap", "name": "m", "lr_label": {"lookup": {"300": 5}}}')
    out = run_align(tmp_path, lr, tile, "--class_map", str(definition))
    assert (read(out)[0] == 5).all()
    with pytest.raises(InputError, match="LR code 300 does not fit in uint8"):
        main(["align", "--lr", lr, "--images", tile, "--out_dir", str(tmp_path / "raw")])


def fault_cases(tmp_path):
    tile = synthetic_tile(tmp_path)
    grid = dict(crs="EPSG:32617", transform=from_origin(500000, 4000000, 2, 2))
    nlcd = np.full((40, 60), 41, dtype=np.uint8)
    return {
        "tile without CRS": (write_geotiff(str(tmp_path / "plain.tif"), np.ones((3, 8, 8), np.uint8), crs=None),
                             write_geotiff(str(tmp_path / "lr.tif"), nlcd, **grid), [], "has no CRS"),
        "LR without CRS": (tile, write_geotiff(str(tmp_path / "nocrs.tif"), nlcd, crs=None), [], "has no CRS"),
        "no overlap": (tile, write_geotiff(str(tmp_path / "far.tif"), nlcd, crs="EPSG:32617",
                                           transform=from_origin(600000, 4000000, 2, 2)), [], "does not overlap"),
        "unknown code": (tile, write_geotiff(str(tmp_path / "odd.tif"), np.full((40, 60), 77, np.uint8), **grid),
                         ["--class_map", "OpenEarthMap_ESA_WorldCover"], "label codes [77]"),
        "fractional codes": (tile, write_geotiff(str(tmp_path / "float.tif"), np.full((40, 60), 10.5, np.float32),
                                                 **grid), [], "whole class codes"),
        "missing LR": (tile, str(tmp_path / "absent.tif"), [], "LR product not found"),
        "empty glob": (tile, str(tmp_path / "none" / "*.tif"), [], "no LR raster matches"),
    }


@pytest.mark.parametrize("case", ["tile without CRS", "LR without CRS", "no overlap", "unknown code",
                                  "fractional codes", "missing LR", "empty glob"])
def test_bad_input_is_one_line_naming_the_file_and_writes_nothing(tmp_path, capsys, case):
    image, lr, extra, message = fault_cases(tmp_path)[case]
    out_dir = tmp_path / "out"
    code = run_cli(main, ["align", "--lr", lr, "--images", image, "--out_dir", str(out_dir), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err
    assert (image in err) or (lr in err) or ("*" in lr)
    assert not out_dir.exists() or not os.listdir(out_dir)


def test_tiles_can_come_from_a_list(tmp_path, capsys):
    (tmp_path / "list.csv").write_text(f"image_fn,label_fn\n{NAIP},\n{CROPS[1]},\n")
    lr, _, _ = lonlat_worldcover(tmp_path, CROPS[1])
    code = run_cli(main, ["align", "--lr", NLCD, lr, "--list_dir", str(tmp_path / "list.csv"),
                          "--out_dir", str(tmp_path / "out")])
    assert code == 0 and sorted(os.listdir(tmp_path / "out")) == [
        "m_3907833_nw_17_1_naip-new_lr.tif", "m_4208701_ne_16_060_20200902_lr.tif"]
    assert "aligned 2 tiles" in capsys.readouterr().out


def test_expand_lr_paths_reads_list_files_relative_to_themselves(tmp_path):
    (tmp_path / "sub").mkdir()
    listing = tmp_path / "sub" / "product.txt"
    listing.write_text("# tiles of the product\na.tif\n/abs/b.tif\n\n")
    assert expand_lr_paths([str(listing)]) == [str(tmp_path / "sub" / "a.tif"), "/abs/b.tif"]
