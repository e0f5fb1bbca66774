"""The image's no-data pixels are written as the map's nodata (mapping/nodata.py, ``--image_nodata``)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from dataset import load_dataset
from mapping.nodata import check_image_nodata, image_nodata_value
from mapping.writer import describe_provenance, map_provenance, map_tile
from tests.helpers import write_geotiff

DATASET = load_dataset("sample")
CLASS = 2


class OneClass(torch.nn.Module):
    """Stand-in network: class 2 everywhere, whatever the pixels (so a 0 in the map can only be no data)."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], DATASET.num_classes, *x.shape[2:])
        logits[:, CLASS] = 20.0
        return logits, logits


def _tile(path, height, width, dtype=np.uint8, fill=0, declared=None):
    """Random pixels with a block of ``fill`` in every band (no data) and, beside it, pixels with ``fill`` in
    one band only (valid). Returns (path, where every band is ``fill``)."""
    rng = np.random.default_rng(0)
    image = rng.integers(10, 250, size=(4, height, width)).astype(dtype)
    image[:, height // 4:height // 2, : width // 3] = fill  # crosses strip and read boundaries
    image[3, height - 5:, :] = fill  # a dark near-infrared row: valid
    image[:, -1, -1] = fill  # the last pixel
    missing = np.zeros((height, width), dtype=bool)
    missing[height // 4:height // 2, : width // 3] = True
    missing[-1, -1] = True
    return write_geotiff(str(path), image, nodata=declared), missing


def _map(tmp_path, image, name="map.tif", **kwargs):
    out, probs = str(tmp_path / name), str(tmp_path / f"probs_{name}")
    map_tile(OneClass(), image, out, dataset=DATASET, chip_size=64, stride=32, batch_size=4, probs_path=probs,
             **kwargs)
    with rasterio.open(out) as src, rasterio.open(probs) as psrc:
        return src.read(1), psrc.read()


@pytest.mark.parametrize("shape", [(150, 130), (40, 50)])  # several strips; smaller than one chip
@pytest.mark.parametrize("num_workers", [0, 2])
def test_pixels_at_the_declared_nodata_in_every_band_are_nodata(tmp_path, shape, num_workers):
    image, missing = _tile(tmp_path / "tile.tif", *shape, declared=0)
    classes, probs = _map(tmp_path, image, num_workers=num_workers)
    assert np.array_equal(classes == 0, missing) and (classes[~missing] == CLASS).all()
    assert (probs[:, missing] == 0).all() and (probs[CLASS][~missing] == 255).all()


def test_none_maps_every_pixel_and_a_value_marks_undeclared_tiles(tmp_path):
    declared, missing = _tile(tmp_path / "declared.tif", 100, 90, declared=0)
    assert (_map(tmp_path, declared, "none.tif", image_nodata="none")[0] == CLASS).all()
    undeclared, _ = _tile(tmp_path / "undeclared.tif", 100, 90)
    assert (_map(tmp_path, undeclared, "auto.tif")[0] == CLASS).all()  # nothing declared: as published
    assert np.array_equal(_map(tmp_path, undeclared, "zero.tif", image_nodata="0")[0] == 0, missing)
    assert (_map(tmp_path, declared, "other.tif", image_nodata="7")[0] == CLASS).all()


def test_other_values_and_float_nan(tmp_path):
    image, missing = _tile(tmp_path / "u16.tif", 90, 70, dtype=np.uint16, fill=65535, declared=65535)
    assert np.array_equal(_map(tmp_path, image, "u16_map.tif")[0] == 0, missing)
    image, missing = _tile(tmp_path / "nan.tif", 90, 70, dtype=np.float32, fill=np.nan, declared=np.nan)
    assert np.array_equal(_map(tmp_path, image, "nan_map.tif")[0] == 0, missing)


def test_setting_parsing_and_provenance():
    assert [check_image_nodata(t) for t in ("auto", "none", "0", "-9999", "nan")] == [None] * 5
    assert check_image_nodata("zero") == "give auto, none or a number (e.g. 0)"
    assert image_nodata_value("auto", 0.0) == 0 and image_nodata_value("auto", None) is None
    assert image_nodata_value("none", 0.0) is None and image_nodata_value("255", None) == 255
    # auto leaves the provenance as it was before the option, so that earlier maps stay current
    assert map_provenance("ab" * 32, "sample", 64, 32) == map_provenance("ab" * 32, "sample", 64, 32, 0, 0, "auto")
    other = map_provenance("ab" * 32, "sample", 64, 32, image_nodata="none")
    assert other != map_provenance("ab" * 32, "sample", 64, 32) and describe_provenance(other).endswith(
        "image nodata none")
