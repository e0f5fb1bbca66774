"""Sliding-window mapping of GeoTIFF tiles of any size (spec section 7), one strip at a time.

The published procedure, kept exactly:

* chip 224, stride 112; grid offsets ``0, stride, 2*stride, ... (< size - chip)`` plus
  ``size - chip``, so the last row and column of chips are flush with the border
  (:func:`chip_offsets`);
* per chip ``p = softmax((vit_logits + cnn_logits) / 2)`` over the classes (the softmax of the
  averaged logits, not the average of two softmaxes);
* a centre-weighted kernel ``K``: 5 in the central ``stride x stride`` square, 1 in the margin
  (at 224/112 the margin is 56 pixels; :func:`center_kernel`);
* ``Acc += p * K`` and ``Cnt += K`` at each chip position, then ``argmax(Acc / Cnt)`` as uint8.

What differs is memory. The published code holds the whole tile and a whole-tile accumulator.
Here chips are processed in row-major grid order and the accumulators hold only one chip-high
band of rows: once every chip of grid row ``i`` is added, rows ``[r_i, r_{i+1})`` can receive no
further chip, so they are divided, argmaxed, written, and the band moves down. Every pixel gets
the same float32 additions in the same order as with a whole-tile accumulator, so the result is
identical (``tests/test_inference.py`` checks this). Host memory is bounded by the chip batch,
a few raw bands of ``chip`` image rows (chips are normalised per batch), the accumulators
(``4 * (classes + 1) * chip`` bytes per column) and a capped GDAL block cache, whatever the tile
height; ``python tools/benchmark.py mapping`` measures it.

Tiles smaller than a chip are reflect-padded up to one chip and the result is cropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from tiles.errors import InputError
from tiles.raster_io import atomic_output, check_bands, normalize, open_raster, read_window

#: Block size of the written GeoTIFFs; finished rows are buffered to whole block rows.
BLOCK_SIZE = 256
#: GDAL block cache while mapping: at least this, or enough for a few block rows of a wide tile.
#: GDAL's default (5 % of RAM) would otherwise keep most of a large input tile cached.
MIN_GDAL_CACHE = 64 << 20
#: Tag holding the dataset definition (JSON) in every written map; mIoU.py reads it.
DATASET_TAG = "VCNET_DATASET"

ReadRows = Callable[[int, int], np.ndarray]
Preprocess = Callable[[np.ndarray], np.ndarray]


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


def chip_offsets(size: int, chip: int, stride: int) -> list[int]:
    """Chip offsets along one axis (spec section 7, step 3).

    ``range(0, size - chip, stride)`` followed by ``size - chip``: the last chip is flush with
    the border and no offset repeats. A side not longer than the chip gets the single offset 0
    (the caller pads it).

    Raises:
        ValueError: chip or stride not positive, or stride above chip (pixels left uncovered).
    """
    if chip <= 0 or stride <= 0:
        raise ValueError(f"chip ({chip}) and stride ({stride}) must be positive")
    if stride > chip:
        raise ValueError(f"stride {stride} is larger than the chip {chip}: pixels would be left out")
    if size <= chip:
        return [0]
    return [*range(0, size - chip, stride), size - chip]


def center_kernel(chip: int, stride: int, weight: float = 5.0) -> np.ndarray:
    """The ``(chip, chip)`` float32 blending kernel: ``weight`` in the centre, 1 elsewhere.

    The centre is the ``stride x stride`` square in the middle (rows and columns
    ``[m, chip - m)`` with ``m = (chip - stride) // 2``), so away from the borders each pixel lies
    in the centre of exactly one chip per axis. For 224/112 this is the published ``[56, 168)``.
    """
    margin = (chip - stride) // 2
    kernel = np.ones((chip, chip), dtype=np.float32)
    kernel[margin:chip - margin, margin:chip - margin] = weight
    return kernel


class StripAccumulator:
    """Weighted probability sums for one chip-high band of rows of the (padded) tile.

    Buffer row 0 is the top row of the current grid row of chips. :meth:`add` adds a chip of
    that grid row; :meth:`release` finishes the top ``n`` rows (``Acc / Cnt``) and moves the band
    down by ``n``.
    """

    def __init__(self, num_classes: int, chip: int, width: int, kernel: np.ndarray):
        self.chip = chip
        self.kernel = kernel
        self.acc = np.zeros((num_classes, chip, width), dtype=np.float32)
        self.cnt = np.zeros((chip, width), dtype=np.float32)

    def add(self, col: int, probs: np.ndarray) -> None:
        """Add ``probs`` ``(C, chip, chip)`` of a chip at column ``col`` of the current grid row."""
        self.acc[:, :, col:col + self.chip] += probs * self.kernel
        self.cnt[:, col:col + self.chip] += self.kernel

    def release(self, rows: int) -> np.ndarray:
        """Return the finished top ``rows`` rows as ``(C, rows, width)`` averages and shift."""
        done = self.acc[:, :rows] / self.cnt[:rows]
        keep = self.chip - rows
        self.acc[:, :keep] = self.acc[:, rows:]
        self.acc[:, keep:] = 0
        self.cnt[:keep] = self.cnt[rows:]
        self.cnt[keep:] = 0
        return done


def _prefetch(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """Yield ``items``, produced ``depth`` ahead by a background thread (``depth`` 0: inline)."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            slots.put((end, None))
        except BaseException as exc:  # handed to the consumer, raised there
            slots.put((end, exc))

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item, error = slots.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                slots.get_nowait()
        worker.join()


def _chip_rows(read_rows: ReadRows, height: int, width: int, chip: int, stride: int
               ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(row, band)`` for each grid row: the ``(C, chip, max(width, chip))`` image band."""
    padded_w = max(width, chip)
    for row in chip_offsets(height, chip, stride):
        band = read_rows(row, min(row + chip, height))
        short_h, short_w = chip - band.shape[1], padded_w - band.shape[2]
        if short_h or short_w:
            band = np.pad(band, ((0, 0), (0, short_h), (0, short_w)), mode="reflect")
        yield row, band


def _batches(chips: Iterable[tuple[int, int, np.ndarray]], size: int) -> Iterator[list[tuple[int, int, np.ndarray]]]:
    batch: list[tuple[int, int, np.ndarray]] = []
    for item in chips:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def _chip_probabilities(model: Callable, batch: Sequence[np.ndarray], preprocess: Preprocess | None,
                        device: torch.device, amp: bool) -> np.ndarray:
    """``softmax((vit + cnn) / 2)`` of a batch of chips, as float32 ``(B, C, chip, chip)``."""
    chips = np.stack(batch)
    x = torch.from_numpy(preprocess(chips) if preprocess else chips).to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        vit_logits, cnn_logits = model(x)
    # (vit + cnn) / 2, in place (halving is exact, so this equals the out-of-place form)
    logits = vit_logits.float().add_(cnn_logits).mul_(0.5)
    return torch.softmax(logits, dim=1).cpu().numpy()


def iter_probability_strips(model: Callable, read_rows: ReadRows, height: int, width: int, *,
                            preprocess: Preprocess | None = None, chip_size: int = 224, stride: int = 112,
                            batch_size: int = 16, device: str | torch.device = "cpu", amp: bool = False,
                            prefetch: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Map a tile band by band: yield ``(row, probs)`` for consecutive finished rows.

    Args:
        model: callable ``x (B, bands, chip, chip) -> (vit_logits, cnn_logits)``, each
            ``(B, C, chip, chip)``.
        read_rows: ``read_rows(r0, r1)`` returns the image rows ``[r0, r1)`` as ``(bands, r1 - r0,
            width)``, raw (then give ``preprocess``) or already as the model's float32 input.
        preprocess: applied to each stacked batch of chips ``(B, bands, chip, chip)`` to give the
            float32 model input, e.g. the per-band normalisation. Normalising chips rather than
            whole rows keeps only raw (uint8) rows in memory.
        height, width: tile size in pixels (any size; tiles smaller than a chip are padded).
        chip_size, stride: the sliding window (published 224 and 112).
        batch_size: chips per forward pass.
        device: where the chips go (the model must already be there).
        amp: bfloat16 autocast (CUDA only; ignored elsewhere).
        prefetch: image bands read ahead by a background thread (0: none).

    Yields:
        ``(row, probs)`` with ``probs`` float32 ``(C, h, width)``: the blended class probabilities
        ``Acc / Cnt`` of tile rows ``[row, row + h)``. Rows come in order and cover the tile once.
    """
    device = torch.device(device)
    offsets = chip_offsets(height, chip_size, stride)
    cols = chip_offsets(width, chip_size, stride)
    padded_h = max(height, chip_size)
    # Rows [offsets[i], ends[i]) are final once grid row i is done.
    ends = dict(zip(offsets, [*offsets[1:], padded_h]))
    kernel = center_kernel(chip_size, stride)
    acc: StripAccumulator | None = None
    current = 0
    # closing(): stop the read-ahead thread before the caller closes the source.
    with contextlib.closing(_prefetch(_chip_rows(read_rows, height, width, chip_size, stride), prefetch)) as bands:
        chips = ((row, col, band[:, :, col:col + chip_size]) for row, band in bands for col in cols)
        for batch in _batches(chips, batch_size):
            probs = _chip_probabilities(model, [c for _, _, c in batch], preprocess, device, amp)
            for (row, col, _), p in zip(batch, probs):
                if acc is None:
                    acc = StripAccumulator(p.shape[0], chip_size, max(width, chip_size), kernel)
                if row != current:
                    yield from _finished(acc, current, row, height, width)
                    current = row
                acc.add(col, p)
    if acc is not None:
        yield from _finished(acc, current, ends[current], height, width)


def _finished(acc: StripAccumulator, row: int, end: int, height: int, width: int) -> Iterator[tuple[int, np.ndarray]]:
    """Release rows ``[row, end)`` of the padded tile, cropped to the real tile."""
    probs = acc.release(end - row)
    rows = min(end, height) - row
    if rows > 0:
        yield row, probs[:, :rows, :width]


def _output_profile(src: rasterio.DatasetReader, count: int, nodata: int | None) -> dict[str, Any]:
    return {
        "driver": "GTiff", "width": src.width, "height": src.height, "count": count, "dtype": "uint8",
        "crs": src.crs, "transform": src.transform, "nodata": nodata, "tiled": True, "blockxsize": BLOCK_SIZE,
        "blockysize": BLOCK_SIZE, "compress": "deflate", "BIGTIFF": "IF_SAFER",
    }


class _BlockRowWriter:
    """Write finished rows to an open GeoTIFF in whole block rows (no partial-block rewrites)."""

    def __init__(self, dst: rasterio.io.DatasetWriter):
        self.dst = dst
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.row = 0

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.pending_rows += rows.shape[1]
        if self.pending_rows >= BLOCK_SIZE:
            self._flush(self.pending_rows - self.pending_rows % BLOCK_SIZE)

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
        with rasterio.open(path, "w", **_output_profile(src, count, None if probabilities else 0)) as dst:
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


def _output_tags(dataset, image_path: str, chip_size: int, stride: int) -> dict[str, str]:
    return {
        DATASET_TAG: json.dumps(dataset.to_dict()),
        "CLASS_NAMES": json.dumps(list(dataset.class_names)),
        "VCNET_SOURCE_IMAGE": os.path.basename(image_path),
        "VCNET_WINDOW": f"chip={chip_size} stride={stride}",
    }


def outputs_exist(out_path: str, probs_path: str | None = None) -> bool:
    """True when every requested output of a tile is already there (the tile can be skipped)."""
    return os.path.isfile(out_path) and (probs_path is None or os.path.isfile(probs_path))


def map_tile(model: Callable, image_path: str, out_path: str, *, dataset, chip_size: int = 224, stride: int = 112,
             batch_size: int = 16, device: str | torch.device = "cpu", amp: bool = False, overwrite: bool = False,
             probs_path: str | None = None, num_workers: int = 0) -> str:
    """Map one GeoTIFF tile into a class-map GeoTIFF (spec section 7).

    The output is uint8, one band, with the input's size, CRS and transform, nodata 0, the
    dataset's colour table, and tags ``CLASS_NAMES`` and ``VCNET_DATASET`` (the definition as
    JSON, which ``mIoU.py`` reads). It is tiled (256) and deflate-compressed, and written under a
    temporary name that is renamed only when complete, so an interrupted run leaves nothing.

    Args:
        model: eval-mode VCNet (or any callable with the same contract) already on ``device``;
            it is switched to eval for the call and restored afterwards.
        image_path: input GeoTIFF with ``dataset.num_bands`` bands.
        out_path: the class map to write.
        dataset: :class:`dataset.DatasetDefinition` for normalisation, classes and colours.
        chip_size, stride, batch_size, device, amp: see :func:`iter_probability_strips`.
        overwrite: re-map even if the outputs exist (otherwise existing outputs are kept).
        probs_path: also write per-class probabilities, uint8 scaled by 255 (band ``i`` = class
            ``i``, band descriptions = class names, scale 1/255).
        num_workers: image bands read ahead in a background thread.

    Returns:
        ``out_path``.

    Raises:
        InputError: naming the file: missing or corrupt tile, wrong band count, or a model whose
            class count differs from the dataset's.
    """
    if not overwrite and outputs_exist(out_path, probs_path):
        return out_path
    module = getattr(model, "module", model)
    was_training = bool(getattr(module, "training", False))
    if hasattr(module, "eval"):
        module.eval()
    try:
        with open_raster(image_path, "image") as src, contextlib.ExitStack() as stack:
            check_bands(src, dataset.num_bands)
            bands = max(src.count, dataset.num_classes if probs_path else 1)
            stack.enter_context(rasterio.Env(GDAL_CACHEMAX=max(MIN_GDAL_CACHE, 4 * BLOCK_SIZE * src.width * bands)))
            tags = _output_tags(dataset, image_path, chip_size, stride)
            # Entered in this order, exited in reverse: the probabilities are renamed before the
            # map, so an existing map means the tile is complete.
            writers = []
            for path, probabilities in [(out_path, False)] + ([(probs_path, True)] if probs_path else []):
                tmp = stack.enter_context(atomic_output(path))
                dst = stack.enter_context(_open_output(tmp, src, dataset, probabilities, tags))
                writers.append(_BlockRowWriter(dst))
            strips = stack.enter_context(contextlib.closing(iter_probability_strips(
                module, lambda r0, r1: read_window(src, Window(0, r0, src.width, r1 - r0)), src.height, src.width,
                preprocess=lambda chips: normalize(chips, dataset.mean, dataset.std), chip_size=chip_size,
                stride=stride, batch_size=batch_size, device=device, amp=amp, prefetch=num_workers)))
            for _, probs in strips:
                if probs.shape[0] != dataset.num_classes:
                    raise InputError(f"{image_path}: the model outputs {probs.shape[0]} classes, dataset "
                                     f"{dataset.name!r} has {dataset.num_classes}")
                writers[0].add(np.argmax(probs, axis=0).astype(np.uint8)[None])
                if probs_path:
                    writers[1].add(np.rint(probs * 255.0).astype(np.uint8))
            for writer in writers:
                writer.close()
    finally:
        if was_training:
            module.train()
    return out_path
