"""Class names where GIS software reads them: GDAL category names in the map's ``.aux.xml``.

A GeoTIFF has no place for category names, so GDAL keeps them in its auxiliary metadata file
(PAM), ``<map>.tif.aux.xml``, which it merges into the map whenever it opens it. QGIS labels the
legend of a map with a colour table with these names (``gdalinfo`` lists them as "Categories"),
so a map opens with "water", "tree canopy", ... instead of 1, 2, ... .
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

from dataset.files import atomic_output


def category_names_path(map_path: str) -> str:
    """The GDAL auxiliary file beside ``map_path`` (``<map>.tif.aux.xml``)."""
    return map_path + ".aux.xml"


def category_names_element(names: Sequence[str]) -> ET.Element:
    """``<CategoryNames>``: entry ``i`` names pixel value ``i`` (the same element in PAM and VRT files)."""
    element = ET.Element("CategoryNames")
    for name in names:
        ET.SubElement(element, "Category").text = name
    return element


def write_category_names(map_path: str, names: Sequence[str]) -> str:
    """Write (atomically) the auxiliary file giving band 1 of ``map_path`` the class names ``names``.

    Returns:
        The auxiliary file's path.
    """
    dataset = ET.Element("PAMDataset")
    band = ET.SubElement(dataset, "PAMRasterBand", band="1")
    band.append(category_names_element(names))
    ET.indent(dataset)
    path = category_names_path(map_path)
    with atomic_output(path) as tmp:
        ET.ElementTree(dataset).write(tmp, encoding="utf-8", xml_declaration=False)
    return path

