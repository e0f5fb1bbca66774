"""Writing a tile's class map (and probabilities) as a GeoTIFF while the sliding window runs.

:func:`map_tile` is the whole job for one tile: it reads the image strip by strip, runs
:func:`mapping.sliding_window.iter_class_strips`, and writes each finished strip of the
class map (argmax) and, if asked, of the probabilities. Outputs keep the input's size, CRS and
transform, carry the dataset's colours and class names, and are written under a temporary name
that is renamed only when complete. File names follow the published convention
(:func:`output_name`), which scoring relies on.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from dataset.errors import InputError
from dataset.raster_io import (
    GEOTIFF_BLOCK,
    check_bands,
    geotiff_profile,
    open_raster,
    raster_problem,
    read_window,
    written_raster,
)
from mapping.legend import category_names_path, write_category_names
from mapping.nodata import AUTO, NodataRows, image_nodata_value
from mapping.overviews import OVERVIEW_MIN_SIZE, add_overviews
from mapping.sliding_window import iter_class_strips

#: GDAL block cache while mapping: at least this, or enough for a few block rows of a wide tile.
#: GDAL's default (5 % of RAM) would otherwise keep most of a large input tile cached.
MIN_GDAL_CACHE = 64 << 20
#: Tag holding the dataset definition (JSON) in every written map; mIoU.py reads it.
DATASET_TAG = "VCNET_DATASET"
#: Tag recording what made a map (checkpoint SHA-256, dataset, chip, stride); a rerun compares it.
PROVENANCE_TAG = "VCNET_PROVENANCE"


def output_name(image_path: str) -> str:
    """File name of the class map of ``image_path``, as published.

    ``naip`` in the base name becomes ``predictions`` (``m_4207563_ne_18_1_naip-new.tif`` ->
    ``m_4207563_ne_18_1_predictions-new.tif``); any other name becomes ``<stem>_pred.tif``.
    """
    base = os.path.basename(image_path)
    if "naip" in base:
        return base.replace("naip", "predictions")
    return os.path.splitext(base)[0] + "_pred.tif"


def probs_name(map_name: str) -> str:
    """File name of the probability raster that goes with the class map ``map_name``."""
    return os.path.splitext(os.path.basename(map_name))[0] + "_probs.tif"


class BlockRowWriter:
    """Write finished rows to an open GeoTIFF in whole block rows (no partial-block rewrites)."""

    def __init__(self, dst: rasterio.io.DatasetWriter):
        self.dst = dst
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.row = 0

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.pending_rows += rows.shape[1]
        if self.pending_rows >= GEOTIFF_BLOCK:
            self._flush(self.pending_rows - self.pending_rows % GEOTIFF_BLOCK)

    def close(self) -> None:
        if self.pending_rows:
            self._flush(self.pending_rows)

    def _flush(self, count: int) -> None:
        data = np.concatenate(self.pending, axis=1) if len(self.pending) > 1 else self.pending[0]
        self.dst.write(data[:, :count], window=Window(0, self.row, data.shape[2], count))
        self.row += count
        rest = data[:, count:]
        self.pending = [rest] if rest.shape[1] else []
        self.pending_rows = rest.shape[1]


@contextlib.contextmanager
def _open_output(path: str, src: rasterio.DatasetReader, dataset, probabilities: bool, tags: dict[str, str]
                 ) -> Iterator[rasterio.io.DatasetWriter]:
    """Create the class map (or, with ``probabilities``, the probability raster) with its metadata."""
    count = dataset.num_classes if probabilities else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        profile = geotiff_profile(width=src.width, height=src.height, count=count, crs=src.crs, transform=src.transform,
                                  nodata=None if probabilities else 0)
        with rasterio.open(path, "w", **profile) as dst:
            dst.update_tags(**tags)
            if probabilities:
                for i, name in enumerate(dataset.class_names, start=1):
                    dst.set_band_description(i, f"p({name})")
                dst.scales = (1.0 / 255.0,) * count
            else:
                dst.write_colormap(1, dataset.colormap())
                dst.set_band_description(1, "class")
                dst.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(dataset.class_names)})
            yield dst


def _recipe_settings(guided_filter: int, label_model_weight: float) -> dict[str, float]:
    """The mapping-time recipe settings that are on, by name (off ones are left out, so that maps made before an
    option existed stay current)."""
    settings = {"guided_filter": guided_filter, "label_model_weight": label_model_weight}
    return {name: value for name, value in settings.items() if value}


def _output_tags(dataset, image_path: str, chip_size: int, stride: int, guided_filter: int,
                 label_model_weight: float) -> dict[str, str]:
    settings = _recipe_settings(guided_filter, label_model_weight)
    window = " ".join([f"chip={chip_size} stride={stride}"] + [f"{name}={value:g}" for name, value in settings.items()])
    return {
        DATASET_TAG: json.dumps(dataset.to_dict()),
        "CLASS_NAMES": json.dumps(list(dataset.class_names)),
        "VCNET_SOURCE_IMAGE": os.path.basename(image_path),
        "VCNET_WINDOW": window,
    }


def map_provenance(checkpoint_sha256: str, dataset_name: str, chip_size: int, stride: int,
                   guided_filter: int = 0, label_model_weight: float = 0.0, image_nodata: str = AUTO) -> str:
    """The :data:`PROVENANCE_TAG` value of maps made with these settings (the guided filter and the label model's
    vote only when on, ``--image_nodata`` only when not ``auto``, so that maps made before they existed stay
    current)."""
    made = {"checkpoint_sha256": checkpoint_sha256, "dataset": dataset_name, "chip_size": chip_size, "stride": stride}
    made.update(_recipe_settings(guided_filter, label_model_weight))
    if image_nodata != AUTO:
        made["image_nodata"] = image_nodata
    return json.dumps(made, sort_keys=True)


def describe_provenance(text: str | None) -> str:
    """A :data:`PROVENANCE_TAG` value in words, for error messages."""
    try:
        made = json.loads(text or "")
        guided = f", guided filter {made['guided_filter']}" if made.get("guided_filter") else ""
        vote = f", label model weight {made['label_model_weight']:g}" if made.get("label_model_weight") else ""
        nodata = f", image nodata {made['image_nodata']}" if "image_nodata" in made else ""
        return (f"checkpoint sha256 {made['checkpoint_sha256'][:12]}, dataset {made['dataset']}, "
                f"chip {made['chip_size']} / stride {made['stride']}{guided}{vote}{nodata}")
    except (ValueError, TypeError, KeyError):
        return "unknown settings (no provenance tag: an older version or another program)"


def output_state(path: str, provenance: str | None) -> tuple[str, str]:
    """``(state, detail)`` of an output: "missing"; "incomplete" (detail: why); "other" (made with other
    settings, detail: which); or "current" (complete and, unless ``provenance`` is None, made with it)."""
    if not os.path.exists(path):
        return "missing", ""
    problem = raster_problem(path)
    if problem is not None:
        return "incomplete", problem
    with open_raster(path, "map") as src:
        found = src.tags().get(PROVENANCE_TAG)
    if provenance is not None and found != provenance:
        return "other", describe_provenance(found)
    return "current", ""


def outputs_exist(out_path: str, probs_path: str | None = None) -> bool:
    """True when every requested output of a tile is already there (the tile can be skipped)."""
    return os.path.isfile(out_path) and (probs_path is None or os.path.isfile(probs_path))


def map_tile(model: Callable, image_path: str, out_path: str, *, dataset, chip_size: int = 224, stride: int = 112,
             batch_size: int = 16, device: str | torch.device = "cpu", amp: bool = False, overwrite: bool = False,
             probs_path: str | None = None, num_workers: int = 0, overview_min_size: int = OVERVIEW_MIN_SIZE,
             provenance: str | None = None, guided_filter: int | None = None, image_nodata: str = AUTO) -> str:
    """Map one GeoTIFF tile into a class-map GeoTIFF (docs/design.md §7).

    The output is uint8, one band, with the input's size, CRS and transform, nodata 0, the
    dataset's colour table, and tags ``CLASS_NAMES`` and ``VCNET_DATASET`` (the definition as
    JSON, which ``mIoU.py`` reads). It is tiled (256) and deflate-compressed, has mode-resampled
    internal overviews when its longer side is at least ``overview_min_size``, and is written
    under a temporary name that is renamed only when complete, so an interrupted run leaves
    nothing. The class names also go to ``<map>.aux.xml`` (GDAL category names, QGIS's legend),
    written before the map is renamed.

    Args:
        model: eval-mode VCNet (or any callable with the same contract) already on ``device``;
            it is switched to eval for the call and restored afterwards.
        image_path: input GeoTIFF with ``dataset.num_bands`` bands.
        out_path: the class map to write.
        dataset: :class:`dataset.DatasetDefinition` for normalisation, classes and colours.
        chip_size, stride, batch_size, device, amp: see :func:`mapping.sliding_window.iter_probability_strips`.
        overwrite: re-map even if the outputs exist (otherwise existing outputs are kept).
        probs_path: also write per-class probabilities, uint8 scaled by 255 (band ``i`` = class
            ``i``, band descriptions = class names, scale 1/255).
        num_workers: image bands read ahead in a background thread; when above 0, the chips are also
            computed in a second thread, so reading, computing and writing overlap.
        overview_min_size: maps whose longer side has at least this many pixels get overviews
            (0: never).
        provenance: :func:`map_provenance` of this run, stored in both outputs.
        guided_filter: radius of the image-guided filter of each chip's probabilities
            (:mod:`mapping.guided_filter`; 0: none); None: the model's ``guided_filter`` (a model loaded from
            a checkpoint carries its recipe's, :func:`networks.checkpoint.model_from_checkpoint`), else 0.
            (A model whose maps hear its label model, :class:`networks.label_model.LabelModelVote`, has its
            ``label_model_weight`` named in the map's tags and provenance.)
        image_nodata: which image pixels are no data, written 0 in the map (and in the probabilities): those
            whose every band holds the tile's declared nodata value (``"auto"``), this value (a number as
            text), or none (``"none"``, every pixel mapped as published); :mod:`mapping.nodata`.

    Returns:
        ``out_path``.

    Raises:
        InputError: naming the file: missing or corrupt tile, wrong band count, a model whose
            class count differs from the dataset's, or an output that could not be completely written.
    """
    if not overwrite and outputs_exist(out_path, probs_path):
        return out_path
    module = getattr(model, "module", model)
    if guided_filter is None:
        guided_filter = int(getattr(module, "guided_filter", 0))
    label_model_weight = float(getattr(module, "label_model_weight", 0))
    was_training = bool(getattr(module, "training", False))
    if hasattr(module, "eval"):
        module.eval()
    try:
        with open_raster(image_path, "image") as src, contextlib.ExitStack() as stack:
            check_bands(src, dataset.num_bands)
            bands = max(src.count, dataset.num_classes if probs_path else 1)
            stack.enter_context(rasterio.Env(GDAL_CACHEMAX=max(MIN_GDAL_CACHE, 4 * GEOTIFF_BLOCK * src.width * bands)))
            tags = _output_tags(dataset, image_path, chip_size, stride, guided_filter, label_model_weight)
            if provenance is not None:
                tags[PROVENANCE_TAG] = provenance
            # Entered in this order, exited in reverse: the probabilities are renamed before the
            # map, so an existing map means the tile is complete.
            writers = []
            for path, probabilities in [(out_path, False)] + ([(probs_path, True)] if probs_path else []):
                tmp = stack.enter_context(written_raster(path, "probabilities" if probabilities else "class map"))
                dst = stack.enter_context(_open_output(tmp, src, dataset, probabilities, tags))
                writers.append(BlockRowWriter(dst))
            def read_rows(r0: int, r1: int) -> np.ndarray:
                return read_window(src, Window(0, r0, src.width, r1 - r0))

            nodata_value = image_nodata_value(image_nodata, src.nodata)
            nodata = NodataRows(read_rows, nodata_value) if nodata_value is not None else None
            strips = stack.enter_context(contextlib.closing(iter_class_strips(
                module, nodata.read_rows if nodata else read_rows, src.height, src.width,
                mean=dataset.mean, std=dataset.std, chip_size=chip_size, stride=stride, batch_size=batch_size,
                device=device, amp=amp, prefetch=num_workers, guided_filter=guided_filter,
                probabilities=probs_path is not None)))
            for strip in strips:
                if strip.num_classes != dataset.num_classes:
                    raise InputError(f"{image_path}: the model outputs {strip.num_classes} classes, dataset "
                                     f"{dataset.name!r} has {dataset.num_classes}")
                if nodata:
                    nodata.blank(strip.row, strip.classes, strip.probs)
                writers[0].add(strip.classes[None])
                if probs_path:
                    writers[1].add(strip.probs)
            for writer in writers:
                writer.close()
            add_overviews(writers[0].dst, overview_min_size)
            write_category_names(out_path, dataset.class_names)
    except BaseException:
        if not os.path.exists(out_path):  # the map failed after its legend was written: no orphan legend
            with contextlib.suppress(OSError):
                os.remove(category_names_path(out_path))
        raise
    finally:
        if was_training:
            module.train()
    return out_path
