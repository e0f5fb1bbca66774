"""Sliding-window mapping of GeoTIFF tiles of any size (docs/design.md §7), one strip at a time.

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
identical (``tests/mapping/test_sliding_window.py`` checks this). Host memory is bounded by the chip batch,
a few raw bands of ``chip`` image rows (chips are normalised per batch), the accumulators
(``4 * (classes + 1) * chip`` bytes per column) and a capped GDAL block cache, whatever the tile
height; ``python tools/benchmark.py mapping`` measures it.

Tiles smaller than a chip are reflect-padded up to one chip and the result is cropped.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

ReadRows = Callable[[int, int], np.ndarray]
Preprocess = Callable[[np.ndarray], np.ndarray]


def chip_offsets(size: int, chip: int, stride: int) -> list[int]:
    """Chip offsets along one axis (docs/design.md §7, step 3).

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
