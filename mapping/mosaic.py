"""A VRT mosaic of a folder of class maps: the whole mapped region opens as one layer.

A VRT is a small XML file that GDAL (QGIS, rasterio, ``gdal_translate``) reads as one raster made
of the maps it lists; nothing is copied. The mosaic keeps the maps' grid (CRS and pixel size),
nodata 0, colour table, class names (as GDAL category names) and the tags that all maps share
(the dataset definition, the window, ...). Paths are relative to the VRT, so the folder can be
moved as a whole.

**Where maps overlap** (NAIP quarter quads share a margin with each neighbour), the seam is the
midline between the two maps' centres: each map supplies the part of the overlap on its own
side, along the axis on which the two centres are further apart. The seam therefore sits in the
middle of the overlap, as far as possible from both maps' edges (where the sliding window saw the
least context), and the result does not depend on the order of the files or of the list. Each map
is cut to its *core* (its extent minus everything beyond those midlines, snapped to its pixel
grid); the cores are laid over the full maps, so a pixel that a cut removed from every map
covering it (possible only along the border of an irregular layout) still comes from a map that
covers it: the full maps are laid north to south, then west to east, the later on top. Only maps
with the same centre (the same tile mapped twice) are told apart by name: the name that sorts
last wins. Pixels that a map leaves at 0 (nodata) show the map below.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np
from rasterio.crs import CRS
from rasterio.errors import CRSError

from dataset.errors import InputError
from dataset.files import atomic_output
from dataset.raster_io import open_raster
from mapping.legend import category_names_element

#: Default file name of the mosaic, in the maps' folder.
MOSAIC_NAME = "mosaic.vrt"
#: Pixel sizes that differ by less than this fraction are the same.
RESOLUTION_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class MapFootprint:
    """Where one map lies: its file, size in pixels, upper-left corner and pixel size (CRS units), and
    its block shape (rows, columns), which the VRT records so that GDAL opens a map only when it reads it."""

    path: str
    width: int
    height: int
    left: float
    top: float
    xres: float
    yres: float
    block: tuple[int, int] = (256, 256)

    @property
    def right(self) -> float:
        return self.left + self.width * self.xres

    @property
    def bottom(self) -> float:
        return self.top - self.height * self.yres


@dataclasses.dataclass
class MapSet:
    """Maps that can form one mosaic, and what they share."""

    footprints: list[MapFootprint]
    crs: CRS
    colormap: dict[int, tuple[int, int, int, int]]
    class_names: list[str]
    tags: dict[str, str]
    band_tags: dict[str, str]


def find_maps(pred_dir: str) -> list[str]:
    """The class maps in ``pred_dir``: its ``*.tif`` files except the ``*_probs.tif`` probabilities.

    Raises:
        InputError: the folder does not exist or has no maps.
    """
    if not os.path.isdir(pred_dir):
        raise InputError(f"{pred_dir}: folder not found")
    paths = sorted(p for p in glob.glob(os.path.join(pred_dir, "*.tif")) if not p.endswith("_probs.tif"))
    if not paths:
        raise InputError(f"{pred_dir}: no class maps (*.tif) in this folder")
    return paths


def _read_map(path: str) -> MapSet:
    """One map as a set of one."""
    with open_raster(path, "map") as src:
        tags = src.tags()
        if src.count != 1 or src.dtypes[0] != "uint8" or "CLASS_NAMES" not in tags:
            raise InputError(f"{path}: not a class map written by test.py (one uint8 band with a CLASS_NAMES tag)")
        t = src.transform
        if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
            raise InputError(f"{path}: rotated or flipped grid {tuple(t)[:6]}; a VRT mosaic needs north-up maps")
        if src.crs is None:
            raise InputError(f"{path}: the map has no CRS, so it cannot be placed in a mosaic")
        footprint = MapFootprint(path, src.width, src.height, t.c, t.f, t.a, -t.e, src.block_shapes[0])
        return MapSet([footprint], src.crs, src.colormap(1), json.loads(tags["CLASS_NAMES"]), tags, src.tags(1))


def _parse_crs(text: str) -> CRS:
    try:
        return CRS.from_user_input(text)
    except CRSError as exc:
        raise InputError(f"--crs {text}: not a CRS ({exc})") from None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _common(a: dict[str, str], b: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in a.items() if b.get(key) == value}


def _join(group: list[MapSet]) -> MapSet:
    """One set of maps in the same CRS; the tags kept are those every map has with the same value
    (the dataset, the window, ...; not the source image's name)."""
    joined = dataclasses.replace(group[0], footprints=[])
    first = group[0].footprints[0]
    for single in group:
        footprint = single.footprints[0]
        for size, reference in ((footprint.xres, first.xres), (footprint.yres, first.yres)):
            if abs(size - reference) > RESOLUTION_TOLERANCE * reference:
                raise InputError(f"{footprint.path}: pixel size {footprint.xres} x {footprint.yres} differs from "
                                 f"{first.path} ({first.xres} x {first.yres}); a VRT mosaic needs one pixel size")
        if single.class_names != joined.class_names or single.colormap != joined.colormap:
            raise InputError(f"{footprint.path}: classes or colours differ from {first.path}")
        joined.footprints.append(footprint)
        joined.tags = _common(joined.tags, single.tags)
        joined.band_tags = _common(joined.band_tags, single.band_tags)
    return joined


def read_maps(paths: Sequence[str], crs: str | None = None) -> MapSet:
    """Read the footprints and shared metadata of ``paths`` (those in ``crs`` if given).

    Raises:
        InputError: naming the map that is not a class map, is rotated, has another pixel size or
            other classes than the first; or maps in several CRSs without ``crs``.
    """
    groups: dict[str, list[MapSet]] = {}
    for path in paths:
        single = _read_map(path)
        groups.setdefault(single.crs.to_string(), []).append(single)
    if crs is not None:
        wanted = _parse_crs(crs)
        found = [key for key, group in groups.items() if group[0].crs == wanted]
        if not found:
            raise InputError(f"--crs {crs}: no map in this CRS (the maps are in {', '.join(groups)})")
        return _join(groups[found[0]])
    if len(groups) > 1:
        counts = ", ".join(f"{key}: {_plural(len(group), 'map')}" for key, group in groups.items())
        raise InputError(f"the maps are in {len(groups)} CRSs ({counts}); a VRT cannot reproject: give --crs "
                         f"to mosaic the maps of one")
    return _join(next(iter(groups.values())))


def core_windows(footprints: Sequence[MapFootprint]) -> list[tuple[int, int, int, int] | None]:
    """Each map's core, ``(col0, row0, col1, row1)`` in its own pixels, or None when nothing is left.

    The core is the map's extent cut, for every map that overlaps it with another centre, at the
    midline between the two centres along the axis on which they are further apart (x on a tie).
    """
    left = np.array([f.left for f in footprints])
    right = np.array([f.right for f in footprints])
    top = np.array([f.top for f in footprints])
    bottom = np.array([f.bottom for f in footprints])
    cx, cy = (left + right) / 2, (top + bottom) / 2
    cores = []
    for i, f in enumerate(footprints):
        overlap = (left < right[i]) & (right > left[i]) & (bottom < top[i]) & (top > bottom[i])
        overlap[i] = False
        dx, dy = cx - cx[i], cy - cy[i]
        across_x = overlap & (np.abs(dx) >= np.abs(dy)) & (dx != 0)
        across_y = overlap & (np.abs(dy) > np.abs(dx))
        mid_x, mid_y = (cx + cx[i]) / 2, (cy + cy[i]) / 2
        core_left = max([left[i], *mid_x[across_x & (dx < 0)]])
        core_right = min([right[i], *mid_x[across_x & (dx > 0)]])
        core_bottom = max([bottom[i], *mid_y[across_y & (dy < 0)]])
        core_top = min([top[i], *mid_y[across_y & (dy > 0)]])
        col0, col1 = (round((x - f.left) / f.xres) for x in (core_left, core_right))
        row0, row1 = (round((f.top - y) / f.yres) for y in (core_top, core_bottom))
        cores.append((col0, row0, col1, row1) if col1 > col0 and row1 > row0 else None)
    return cores


def _number(value: float) -> str:
    """Pixel offsets: integers as such, else enough decimals for a sub-pixel shift."""
    nearest = round(value)
    return str(nearest) if abs(value - nearest) < 1e-6 else repr(round(value, 6))


def _source(parent: ET.Element, footprint: MapFootprint, window: tuple[int, int, int, int], vrt_dir: str,
            origin: tuple[float, float], res: tuple[float, float]) -> None:
    col0, row0, col1, row1 = window
    source = ET.SubElement(parent, "ComplexSource")
    relative = os.path.relpath(os.path.abspath(footprint.path), vrt_dir).replace(os.sep, "/")
    ET.SubElement(source, "SourceFilename", relativeToVRT="1").text = relative
    ET.SubElement(source, "SourceBand").text = "1"
    ET.SubElement(source, "SourceProperties", RasterXSize=str(footprint.width), RasterYSize=str(footprint.height),
                  DataType="Byte", BlockXSize=str(footprint.block[1]), BlockYSize=str(footprint.block[0]))
    ET.SubElement(source, "SrcRect", xOff=str(col0), yOff=str(row0), xSize=str(col1 - col0), ySize=str(row1 - row0))
    x0 = (footprint.left + col0 * footprint.xres - origin[0]) / res[0]
    y0 = (origin[1] - (footprint.top - row0 * footprint.yres)) / res[1]
    ET.SubElement(source, "DstRect", xOff=_number(x0), yOff=_number(y0),
                  xSize=_number((col1 - col0) * footprint.xres / res[0]),
                  ySize=_number((row1 - row0) * footprint.yres / res[1]))
    ET.SubElement(source, "NODATA").text = "0"


def mosaic_xml(maps: MapSet, vrt_path: str) -> ET.Element:
    """The VRT of ``maps`` with paths relative to ``vrt_path``'s folder (see the module doc for the rule)."""
    footprints = maps.footprints
    res = (footprints[0].xres, footprints[0].yres)
    left = min(f.left for f in footprints)
    top = max(f.top for f in footprints)
    width = math.ceil((max(f.right for f in footprints) - left) / res[0] - 1e-6)
    height = math.ceil((top - min(f.bottom for f in footprints)) / res[1] - 1e-6)
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = maps.crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = f"{left!r}, {res[0]!r}, 0, {top!r}, 0, {-res[1]!r}"
    _metadata(root, maps.tags)
    band = ET.SubElement(root, "VRTRasterBand", dataType="Byte", band="1")
    ET.SubElement(band, "Description").text = "class"
    ET.SubElement(band, "NoDataValue").text = "0"
    ET.SubElement(band, "ColorInterp").text = "Palette"
    table = ET.SubElement(band, "ColorTable")
    for index in range(max(maps.colormap) + 1):
        rgba = maps.colormap.get(index, (0, 0, 0, 0))
        ET.SubElement(table, "Entry", c1=str(rgba[0]), c2=str(rgba[1]), c3=str(rgba[2]), c4=str(rgba[3]))
    band.append(category_names_element(maps.class_names))
    _metadata(band, maps.band_tags)
    # Later sources are drawn over earlier ones: full maps first, in a fixed order by position, then the cores.
    order = sorted(range(len(footprints)), key=lambda i: (-(footprints[i].top + footprints[i].bottom),
                                                          footprints[i].left + footprints[i].right,
                                                          os.path.basename(footprints[i].path)))
    vrt_dir = os.path.dirname(os.path.abspath(vrt_path))
    for i in order:
        f = footprints[i]
        _source(band, f, (0, 0, f.width, f.height), vrt_dir, (left, top), res)
    cores = core_windows(footprints)
    for i in order:
        if cores[i] is not None:
            _source(band, footprints[i], cores[i], vrt_dir, (left, top), res)
    ET.indent(root)
    return root


def _metadata(parent: ET.Element, items: dict[str, str]) -> None:
    if items:
        metadata = ET.SubElement(parent, "Metadata")
        for key, value in items.items():
            ET.SubElement(metadata, "MDI", key=key).text = value


@dataclasses.dataclass
class MosaicSummary:
    path: str
    maps: int
    width: int
    height: int
    crs: str


def write_mosaic(paths: Sequence[str], vrt_path: str, crs: str | None = None) -> MosaicSummary:
    """Write (atomically) the VRT mosaic of the class maps ``paths`` (those in ``crs`` if given).

    Raises:
        InputError: see :func:`read_maps`.
    """
    maps = read_maps(paths, crs)
    root = mosaic_xml(maps, vrt_path)
    with atomic_output(vrt_path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=False)
    return MosaicSummary(vrt_path, len(maps.footprints), int(root.get("rasterXSize")),
                         int(root.get("rasterYSize")), maps.crs.to_string())
