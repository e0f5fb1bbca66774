"""What makes a map usable in a GIS: class names where GDAL and QGIS read them, mode-resampled
overviews on large maps, and a legend on the preview PNGs."""

from __future__ import annotations

import glob
import os

import numpy as np
import rasterio
import torch
from PIL import Image

from dataset import load_dataset
from mapping.legend import category_names_path
from mapping.overviews import OVERVIEW_MIN_SIZE, overview_factors
from mapping.preview import LEGEND_ROW, TITLE_HEIGHT, class_legend, eval_colors, write_preview
from mapping.writer import map_tile
from tests.helpers import gdalinfo, write_geotiff

DATASET = load_dataset("sample")


class BlockPattern(torch.nn.Module):
    """Stand-in network: class 1 where band 1 is above the dataset mean, else class 4."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], DATASET.num_classes, *x.shape[2:])
        bright = x[:, 0] > 0
        logits[:, 1][bright] = 10.0
        logits[:, 4][~bright] = 10.0
        return logits, logits


def _pattern_tile(path, height, width):
    """An image whose map is 2 x 2 blocks of [[4, 4], [4, 1]]: the mode of each block is 4, while
    nearest-neighbour reduction would keep the 1 and an average would give 3."""
    image = np.full((4, height, width), 50, dtype=np.uint8)
    image[:, 1::2, 1::2] = 200
    return write_geotiff(str(path), image)


def _map(tmp_path, height, width, **kwargs):
    image = _pattern_tile(tmp_path / "tile_naip.tif", height, width)
    out = str(tmp_path / "maps" / "tile_predictions.tif")
    map_tile(BlockPattern(), image, out, dataset=DATASET, chip_size=64, stride=32, batch_size=32, **kwargs)
    return out


def test_class_names_are_gdal_category_names(tmp_path):
    out = _map(tmp_path, 70, 90)
    assert os.path.isfile(category_names_path(out)) and category_names_path(out).endswith(".tif.aux.xml")
    band = gdalinfo(out)["bands"][0]
    # What QGIS labels the legend of a paletted map with (GDALGetRasterCategoryNames), and gdalinfo prints.
    assert band["categories"] == list(DATASET.class_names)
    assert band["colorInterpretation"] == "Palette" and band["noDataValue"] == 0
    assert [e[:3] for e in band["colorTable"]["entries"][:DATASET.num_classes]] == \
        [list(c) for c in DATASET.class_colors]
    assert not glob.glob(str(tmp_path / "maps" / ".*"))  # no temporary file left behind
    with rasterio.open(out) as src:
        assert src.overviews(1) == []  # a small map: no overviews
        assert np.array_equal(np.unique(src.read(1)), [1, 4])


def test_large_maps_get_mode_overviews(tmp_path):
    assert overview_factors(10_000, 10_000) == [2, 4, 8, 16, 32, 64]
    assert overview_factors(OVERVIEW_MIN_SIZE - 1, 100) == [] and overview_factors(5000, 100, min_size=0) == []
    out = _map(tmp_path, 520, 600, overview_min_size=512)
    with rasterio.open(out) as src:
        assert src.overviews(1) == [2, 4]
        assert src.tags(ns="rio_overview") == {"resampling": "mode"}
        assert src.colormap(1)[4][:3] == tuple(DATASET.class_colors[4])
    for level, shape in enumerate([(260, 300), (130, 150)]):
        with rasterio.open(out, overview_level=level) as src:
            pixels = src.read(1)
        assert pixels.shape == shape and (pixels == 4).all()  # the mode of every block
    assert len(gdalinfo(out)["bands"][0]["overviews"]) == 2


def test_preview_has_a_legend_of_class_colours(tmp_path):
    image = _pattern_tile(tmp_path / "tile_naip.tif", 40, 300)
    pred = write_geotiff(str(tmp_path / "pred.tif"), np.ones((1, 40, 300), dtype=np.uint8))
    png = write_preview(str(tmp_path / "p.png"), image, pred, DATASET)
    pixels = np.asarray(Image.open(png).convert("RGB"))
    panels_height = TITLE_HEIGHT + 40
    assert pixels.shape[0] == panels_height + LEGEND_ROW + 2  # one legend row below the panels
    legend = pixels[panels_height:].reshape(-1, 3)
    for color in DATASET.class_colors[1:]:
        assert (legend == color).all(axis=1).sum() >= 10 * 10, color  # a swatch of each class colour
    # Names that do not fit the width wrap onto more rows.
    narrow = class_legend(list(zip(DATASET.class_names, DATASET.class_colors)), width=120)
    assert narrow.height > 2 * LEGEND_ROW


def test_preview_legends_the_reference_classes_when_they_differ(tmp_path):
    dataset = load_dataset("Chesapeake_NLCD16")  # 17 model classes scored as 5 evaluation classes
    image = _pattern_tile(tmp_path / "tile_naip.tif", 40, 60)
    pred = write_geotiff(str(tmp_path / "pred.tif"), np.full((1, 40, 60), 3, dtype=np.uint8))
    reference = write_geotiff(str(tmp_path / "lc.tif"), np.ones((1, 40, 60), dtype=np.uint8))
    png = Image.open(write_preview(str(tmp_path / "b.png"), image, pred, dataset, hr_path=reference))
    model = class_legend(list(zip(dataset.class_names, dataset.class_colors)), png.width)
    evaluation = class_legend(list(zip(dataset.eval_names, eval_colors(dataset))), png.width, title="HR reference:")
    assert png.height == TITLE_HEIGHT + 40 + model.height + evaluation.height
    below = np.asarray(png.convert("RGB"))[TITLE_HEIGHT + 40 + model.height:]
    assert np.array_equal(below, np.asarray(evaluation))
