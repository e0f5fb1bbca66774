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
a few bands of ``chip`` image rows (each image row read and normalised once), the accumulators
(``4 * (classes + 1) * chip`` bytes per column) and a capped GDAL block cache, whatever the tile
height; ``python tools/benchmark.py mapping`` measures it.

Tiles smaller than a chip are reflect-padded up to one chip and the result is cropped.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from mapping.guided_filter import guided_filter

ReadRows = Callable[[int, int], np.ndarray]


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


def _one_thread(function: Callable) -> Callable:
    """Run ``function`` with one intra-op CPU thread, then restore torch's setting.

    The pipeline's own CPU work (normalising, softmax, blending, argmax) is memory-bound: split over
    threads it gains little, and its barriers stall whenever the reading or writing thread (or
    another process) holds a core. The model keeps torch's setting. The setting is per thread.
    """
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        if threads == 1:
            return function(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


class BandNormaliser:
    """Per-band ``(x - mean) / std`` of raw image rows, on their device, bit for bit as
    :func:`dataset.raster_io.normalize` (float64 arithmetic rounded to float32).

    8-bit pixels go through a per-band table of the 256 values, each computed in float64 and
    rounded once, so the result is identical at a fraction of the cost; other pixel types are
    computed in float64 on the device.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.mean = torch.tensor(mean, dtype=torch.float64, device=device).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float64, device=device).view(-1, 1, 1)
        levels = torch.arange(256, dtype=torch.float64, device=device).view(1, -1, 1)
        self.table = ((levels - self.mean) / self.std).view(len(mean), 256).float()

    @_one_thread
    @torch.inference_mode()
    def __call__(self, band: torch.Tensor) -> torch.Tensor:
        """``band`` ``(bands, h, w)`` raw pixels -> float32 model input of the same shape."""
        if band.dtype != torch.uint8:
            return ((band.double() - self.mean) / self.std).float()
        out = torch.empty(band.shape, dtype=torch.float32, device=band.device)
        for index in range(band.shape[0]):
            torch.index_select(self.table[index], 0, band[index].reshape(-1).int(), out=out[index].view(-1))
        return out


class StripAccumulator:
    """Weighted probability sums for one chip-high band of rows of the (padded) tile, on the device.

    Buffer row 0 is the top row of the current grid row of chips. :meth:`start_grid_row` adds the
    grid row's kernel weights to the counts (integers, so their order does not matter); :meth:`add`
    adds a chip's kernel-weighted probabilities; :meth:`release` finishes the top ``n`` rows
    (``Acc / Cnt``) and moves the band down by ``n``.
    """

    @torch.inference_mode()
    def __init__(self, num_classes: int, chip: int, cols: Sequence[int], width: int, kernel: torch.Tensor):
        self.chip = chip
        self.acc = torch.zeros((num_classes, chip, width), device=kernel.device)
        self.spare = torch.empty_like(self.acc)
        self.cnt = torch.zeros((chip, width), device=kernel.device)
        self.row_weights = torch.zeros((chip, width), device=kernel.device)
        for col in cols:
            self.row_weights[:, col:col + chip] += kernel

    @_one_thread
    @torch.inference_mode()
    def start_grid_row(self) -> None:
        self.cnt += self.row_weights

    @_one_thread
    @torch.inference_mode()
    def add(self, col: int, weighted: torch.Tensor) -> None:
        """Add ``weighted`` ``(C, chip, chip)`` (``p * K``) of a chip at column ``col``."""
        self.acc[:, :, col:col + self.chip] += weighted

    @_one_thread
    @torch.inference_mode()
    def release(self, rows: int) -> torch.Tensor:
        """Return the finished top ``rows`` rows as ``(C, rows, width)`` averages and shift."""
        done = self.acc[:, :rows] / self.cnt[:rows]
        keep = self.chip - rows
        self.spare[:, :keep] = self.acc[:, rows:]
        self.spare[:, keep:] = 0
        self.acc, self.spare = self.spare, self.acc
        self.cnt = torch.cat([self.cnt[rows:], torch.zeros_like(self.cnt[:rows])])
        return done


def _prefetch(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """Yield ``items``, produced ``depth`` ahead by a background thread (``depth`` 0: inline).

    The thread closes ``items`` when it stops, so nested read-ahead stops with it."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            with contextlib.closing(iter(items)) if hasattr(items, "close") else contextlib.nullcontext():
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


def _chip_rows(read_rows: ReadRows, height: int, width: int, chip: int, stride: int, device: torch.device,
               normalise: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(row, band)`` for each grid row: the ``(C, chip, max(width, chip))`` image band as a
    tensor ready for :func:`_on_device`: normalised already for the CPU, raw and pinned for CUDA
    (the raw pixels are the smaller copy; pinned memory lets the copy overlap device work).

    Consecutive bands overlap by ``chip - stride`` rows: those are taken from the previous band, so
    each image row is read (and, on the CPU, normalised) once."""
    padded_w = max(width, chip)
    pinned = device.type == "cuda"
    previous_row, previous = 0, None
    for row in chip_offsets(height, chip, stride):
        kept = previous_row + chip - row if previous is not None else 0
        fresh = read_rows(row + kept, min(row + chip, height))
        short_h, short_w = chip - kept - fresh.shape[1], padded_w - fresh.shape[2]
        if short_h or short_w:  # a tile smaller than the chip: a single band when short_h
            fresh = np.pad(fresh, ((0, 0), (0, short_h), (0, short_w)), mode="reflect")
        tensor = torch.from_numpy(np.ascontiguousarray(fresh))
        if not pinned:
            tensor = normalise(tensor) if normalise else tensor.float()
        if kept:
            band = torch.empty((tensor.shape[0], chip, padded_w), dtype=tensor.dtype, pin_memory=pinned)
            tensor = torch.cat([previous[:, chip - kept:], tensor], dim=1, out=band)
        elif pinned:
            tensor = tensor.pin_memory()
        previous_row, previous = row, tensor
        yield row, tensor


def _on_device(bands: Iterable[tuple[int, torch.Tensor]], device: torch.device,
               normalise: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator[tuple[int, torch.Tensor]]:
    for row, band in bands:
        if band.device != device:
            band = band.to(device, non_blocking=True)
            band = normalise(band) if normalise else band.float()
        yield row, band


def _batches(chips: Iterable[tuple[int, int, torch.Tensor]], size: int
             ) -> Iterator[list[tuple[int, int, torch.Tensor]]]:
    batch: list[tuple[int, int, torch.Tensor]] = []
    for item in chips:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def _softmax_of_mean(vit_logits: torch.Tensor, cnn_logits: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor
                     ) -> torch.Tensor:
    """``probs = softmax((vit + cnn) / 2)`` over the classes, through the buffer ``logits`` (the halving is
    exact in float32; out of place, so the model's outputs stay as they are)."""
    torch.add(vit_logits.float(), cnn_logits, out=logits).mul_(0.5)
    return torch.softmax(logits, dim=1, out=probs)


@_one_thread
@torch.inference_mode()
def _weighted_softmax(vit_logits: torch.Tensor, cnn_logits: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor,
                      kernel: torch.Tensor) -> None:
    _softmax_of_mean(vit_logits, cnn_logits, logits, probs).mul_(kernel)


@_one_thread
def _stack(chips: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    torch.stack(list(chips), out=out)


class _ChipWork:
    """``softmax((vit + cnn) / 2) * K`` of batches of chips, in buffers reused from batch to batch
    (fresh multi-megabyte tensors cost page faults on the CPU at every batch); with ``guided_filter``
    R > 0 the softmax is filtered with the chip as the guide (:func:`mapping.guided_filter.guided_filter`)
    before the weighting.

    On a CPU with more than one intra-op thread, stacking and weighting (one thread each, see
    :func:`_one_thread`) split each batch in two halves, one of them in a helper thread: per-chip work, so
    the bits are the same, without the barriers of OpenMP threads (on 2 cores, about 1.5x the speed of
    one thread when nothing else runs).
    """

    def __init__(self, model: Callable, kernel: torch.Tensor, amp: bool, guided_filter: int = 0):
        self.model, self.kernel, self.guided_filter = model, kernel, guided_filter
        self.autocast = amp and kernel.device.type == "cuda"
        self.buffers: dict[str, torch.Tensor] = {}
        two_threads = kernel.device.type == "cpu" and torch.get_num_threads() > 1
        self.helper = concurrent.futures.ThreadPoolExecutor(1) if two_threads else None

    def close(self) -> None:
        if self.helper is not None:
            self.helper.shutdown()

    def _buffer(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        """A ``shape`` view of the buffer ``name``, grown when too small."""
        held = self.buffers.get(name)
        if held is None or held.shape[0] < shape[0] or held.shape[1:] != tuple(shape[1:]):
            held = self.buffers[name] = torch.empty(tuple(shape), device=self.kernel.device)
        return held[:shape[0]]

    def _in_halves(self, function: Callable[..., None], *batches: Sequence[Any], shared: Sequence[Any] = ()) -> None:
        """``function(*batches, *shared)``, or, with the helper, the same on each half of the batches."""
        half = len(batches[0]) // 2
        if self.helper is None or half == 0:
            function(*batches, *shared)
            return
        other = self.helper.submit(function, *(b[half:] for b in batches), *shared)
        try:
            function(*(b[:half] for b in batches), *shared)
        finally:
            other.result()

    def __call__(self, chips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Float32 ``(B, C, chip, chip)`` for the ``(bands, chip, chip)`` ``chips``; valid until the next call."""
        batch = self._buffer("chips", (len(chips), *chips[0].shape))
        self._in_halves(_stack, chips, batch)
        vit_logits, cnn_logits = self._forward(batch)
        logits, probs = (self._buffer(name, vit_logits.shape) for name in ("logits", "weighted"))
        if self.guided_filter:
            # on torch's threads, as the model: unlike the memory-bound steps of the weighting, the filter's
            # products and solves gain from them (on 2 CPU cores 1.7x the chips/s of one thread at chip 64)
            with torch.inference_mode():
                probs = guided_filter(batch, _softmax_of_mean(vit_logits, cnn_logits, logits, probs),
                                      self.guided_filter)
                return probs.mul_(self.kernel)
        self._in_halves(_weighted_softmax, vit_logits, cnn_logits, logits, probs, shared=(self.kernel,))
        return probs

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext():
            return self.model(batch)


def _blended_strips(model: Callable, read_rows: ReadRows, height: int, width: int, *,
                    mean: Sequence[float] | None, std: Sequence[float] | None, chip_size: int, stride: int,
                    batch_size: int, device: torch.device, amp: bool, prefetch: int, guided_filter: int = 0
                    ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(row, probs)`` for consecutive finished rows; ``probs`` ``(C, h, width)`` on ``device``."""
    offsets = chip_offsets(height, chip_size, stride)
    cols = chip_offsets(width, chip_size, stride)
    padded_h, padded_w = max(height, chip_size), max(width, chip_size)
    # Rows [offsets[i], ends[i]) are final once grid row i is done.
    ends = dict(zip(offsets, [*offsets[1:], padded_h]))
    kernel = torch.from_numpy(center_kernel(chip_size, stride)).to(device)
    normalise = BandNormaliser(mean, std, device) if mean is not None and std is not None else None
    acc: StripAccumulator | None = None
    current = 0
    reader = _chip_rows(read_rows, height, width, chip_size, stride, device, normalise)
    # closing(): stop the read-ahead thread before the caller closes the source.
    with contextlib.closing(_prefetch(reader, prefetch)) as bands, \
            contextlib.closing(_ChipWork(model, kernel, amp, guided_filter)) as work:
        chips = ((row, col, band[:, :, col:col + chip_size])
                 for row, band in _on_device(bands, device, normalise) for col in cols)
        for batch in _batches(chips, batch_size):
            weighted = work([c for _, _, c in batch])
            for (row, col, _), chip_weighted in zip(batch, weighted):
                if acc is None:
                    acc = StripAccumulator(weighted.shape[1], chip_size, cols, padded_w, kernel)
                    acc.start_grid_row()
                if row != current:
                    yield from _finished(acc, current, row, height, width)
                    acc.start_grid_row()
                    current = row
                acc.add(col, chip_weighted)
    if acc is not None:
        yield from _finished(acc, current, ends[current], height, width)


def _finished(acc: StripAccumulator, row: int, end: int, height: int, width: int
              ) -> Iterator[tuple[int, torch.Tensor]]:
    """Release rows ``[row, end)`` of the padded tile, cropped to the real tile."""
    probs = acc.release(end - row)
    rows = min(end, height) - row
    if rows > 0:
        yield row, probs[:, :rows, :width]


def iter_probability_strips(model: Callable, read_rows: ReadRows, height: int, width: int, *,
                            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                            chip_size: int = 224, stride: int = 112, batch_size: int = 16,
                            device: str | torch.device = "cpu", amp: bool = False,
                            prefetch: int = 0, guided_filter: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Map a tile band by band: yield ``(row, probs)`` for consecutive finished rows.

    Args:
        model: callable ``x (B, bands, chip, chip) -> (vit_logits, cnn_logits)``, each
            ``(B, C, chip, chip)``, already on ``device``.
        read_rows: ``read_rows(r0, r1)`` returns the image rows ``[r0, r1)`` as ``(bands, r1 - r0,
            width)``: raw pixels (then give ``mean`` and ``std``) or already the model's input.
        height, width: tile size in pixels (any size; tiles smaller than a chip are padded).
        mean, std: per-band normalisation ``(x - mean) / std``, done on the device (numerics of
            :func:`dataset.raster_io.normalize`); None: the rows are used as they are (as float32).
        chip_size, stride: the sliding window (published 224 and 112).
        batch_size: chips per forward pass.
        device: where the chips, the softmax and the blending go (the model must already be there).
        amp: bfloat16 autocast of the model (CUDA only; ignored elsewhere). Softmax and blending
            stay float32.
        prefetch: image bands read ahead by a background thread (0: none).
        guided_filter: radius R of the image-guided filter of each chip's probabilities (0: none;
            :mod:`mapping.guided_filter`).

    Yields:
        ``(row, probs)`` with ``probs`` float32 ``(C, h, width)`` on the host: the blended class
        probabilities ``Acc / Cnt`` of tile rows ``[row, row + h)``. Rows come in order and cover
        the tile once. :func:`iter_class_strips` brings back only the uint8 class map.
    """
    strips = _blended_strips(model, read_rows, height, width, mean=mean, std=std, chip_size=chip_size,
                             stride=stride, batch_size=batch_size, device=torch.device(device), amp=amp,
                             prefetch=prefetch, guided_filter=guided_filter)
    with contextlib.closing(strips):
        for row, probs in strips:
            yield row, probs.cpu().numpy()


class ClassStrip(NamedTuple):
    """Finished rows ``[row, row + h)`` of a tile's map, on the host."""

    row: int
    classes: np.ndarray  #: ``(h, width)`` uint8: argmax of the blended probabilities
    probs: np.ndarray | None  #: ``(C, h, width)`` uint8: the blended probabilities x 255, rounded, if asked
    num_classes: int


def _class_map(probs: torch.Tensor) -> torch.Tensor:
    """Argmax over the classes as uint8; the first maximum on ties, as ``np.argmax``."""
    if probs.device.type != "cpu":
        return probs.argmax(0).to(torch.uint8)
    # On the CPU a reduction over the first axis strides through memory (numpy's takes 5x the time
    # of these passes over contiguous class planes). Classes come in increasing order, so where a
    # class beats the running maximum it is also larger than the index held: max(index, c * beats).
    # Where a pixel is NaN every class is (a softmax), and both give 0.
    best = probs[0].clone()
    index = torch.zeros(probs.shape[1:], dtype=torch.uint8)
    beats = torch.empty(probs.shape[1:], dtype=torch.bool)
    for c in range(1, probs.shape[0]):
        torch.gt(probs[c], best, out=beats)
        torch.maximum(best, probs[c], out=best)
        torch.maximum(index, beats.view(torch.uint8).mul(c), out=index)
    return index


@_one_thread
@torch.inference_mode()
def _uint8_outputs(probs: torch.Tensor, with_probs: bool) -> list[torch.Tensor]:
    """The class map and, if asked, the probabilities x 255 rounded half to even (as ``np.rint``)."""
    return [_class_map(probs)] + ([probs.mul(255.0).round_().to(torch.uint8)] if with_probs else [])


class _HostStrip:
    """A released strip on its way to the host as uint8.

    On CUDA the uint8 outputs are computed and copied (non-blocking, into pinned memory) as soon as
    the strip is released, and :meth:`wait` waits for the copy: the device goes on with the next
    rows meanwhile. On the CPU :meth:`wait` computes them, in the thread that asks for them.
    """

    def __init__(self, row: int, probs: torch.Tensor, with_probs: bool):
        self.row, self.num_classes, self.with_probs = row, probs.shape[0], with_probs
        self.probs: torch.Tensor | None = probs
        self.event = None
        if probs.device.type != "cpu":
            self.outputs = [torch.empty(t.shape, dtype=t.dtype, pin_memory=probs.device.type == "cuda")
                            .copy_(t, non_blocking=True) for t in _uint8_outputs(probs, with_probs)]
            self.probs = None
            if probs.device.type == "cuda":
                self.event = torch.cuda.Event()
                self.event.record(torch.cuda.current_stream(probs.device))

    def wait(self) -> ClassStrip:
        if self.probs is not None:
            self.outputs = _uint8_outputs(self.probs, self.with_probs)
        if self.event is not None:
            self.event.synchronize()
        arrays = [t.numpy() for t in self.outputs]
        return ClassStrip(self.row, arrays[0], arrays[1] if self.with_probs else None, self.num_classes)


def _host_strips(model: Callable, read_rows: ReadRows, height: int, width: int, probabilities: bool,
                 **window: Any) -> Iterator[_HostStrip]:
    if window["device"].type == "cuda":  # this may be a new thread, whose current device is GPU 0
        torch.cuda.set_device(window["device"])
    strips = _blended_strips(model, read_rows, height, width, **window)
    with contextlib.closing(strips):
        for row, probs in strips:
            yield _HostStrip(row, probs, probabilities)


def iter_class_strips(model: Callable, read_rows: ReadRows, height: int, width: int, *,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      chip_size: int = 224, stride: int = 112, batch_size: int = 16,
                      device: str | torch.device = "cpu", amp: bool = False, prefetch: int = 0,
                      guided_filter: int = 0, probabilities: bool = False) -> Iterator[ClassStrip]:
    """Map a tile band by band: yield a :class:`ClassStrip` for consecutive finished rows.

    Softmax and blending are computed on ``device``, and so are the argmax (and the uint8
    probabilities) unless it is the CPU; only uint8 rows come back. With ``prefetch``, reading,
    device work and the caller's work on the strips (writing) overlap: bands are read by one
    background thread and the chips computed by another, a strip ahead of the caller (which, on
    the CPU, also takes the argmax).

    Args: those of :func:`iter_probability_strips`, and
        probabilities: also return the probabilities as uint8 (x 255).
    """
    strips = _host_strips(model, read_rows, height, width, probabilities, mean=mean, std=std,
                          chip_size=chip_size, stride=stride, batch_size=batch_size,
                          device=torch.device(device), amp=amp, prefetch=prefetch, guided_filter=guided_filter)
    with contextlib.closing(_prefetch(strips, 2 if prefetch else 0)) as ready:
        for strip in ready:
            yield strip.wait()
