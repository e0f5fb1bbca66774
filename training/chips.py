"""Streaming training chips from GeoTIFF tiles with windowed reads (docs/design.md §6.3, defects 7-11 fixed).

:class:`ChipStream` is an ``IterableDataset`` that yields ready-made batches (use it with
``DataLoader(stream, batch_size=None)``). Each (rank, loader worker) reads its own shard of the
epoch's shuffled tile order (:mod:`training.sampling`); for each tile it draws ``chips_per_tile``
positions, reads the label window and then the image window, skips chips with a no-data label
pixel or an all-zero image pixel, and groups the valid chips into batches of ``batch_size``. The
last batch of a worker is kept when it has at least two chips and dropped when it has one, so a
1-chip batch never reaches BatchNorm.

Workers send raw pixels (the file's integer type, uint8 for NAIP) and class indices (uint8);
normalisation happens on the device (:func:`normalize_on_device`, docs/design.md §2).

Items of the stream are typed records:

* :class:`ChipBatch`: ``image`` (B, bands, S, S), ``label`` (B, S, S) class indices, ``chips``
  int64 (B, 3) rows of (tile index in the list, row, col), ``skipped`` chips this worker skipped
  since its previous batch;
* :class:`TileNotice`: a tile smaller than a chip, or a tile that gave no valid chip this epoch
  (the consumer reports each tile once);
* :class:`StreamError`: bad input met while reading (the consumer raises it as an InputError);
* :class:`WorkerDone`: the worker's last words for the epoch (chips skipped since its last batch,
  chips dropped because they could not fill a batch of two).

They are named tuples, so the DataLoader's pinned-memory thread pins the batch tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from rasterio.windows import Window

from dataset import DatasetDefinition, TileEntry
from dataset.errors import InputError
from dataset.raster_io import STRIP_ROWS, blank_pixels, check_same_grid, open_raster, read_strips, read_window
from training.sampling import centre_on_points, chip_positions, epoch_order, focus_rng, shard, tile_rng

TORCH_PIXEL_TYPES = ("uint8", "int8", "int16", "int32", "int64", "float32", "float64")


class ChipBatch(NamedTuple):
    image: torch.Tensor
    label: torch.Tensor
    chips: torch.Tensor
    skipped: int
    codes: torch.Tensor | None = None  # raw LR codes (int32), when the stream was asked for them


class TileNotice(NamedTuple):
    tile: int
    message: str


class StreamError(NamedTuple):
    message: str


class WorkerDone(NamedTuple):
    skipped: int
    dropped: int


StreamItem = ChipBatch | TileNotice | StreamError | WorkerDone


def chip_is_valid(raw_label: np.ndarray, image: np.ndarray | None, nodata: Sequence[int],
                  image_nodata: float | None = None) -> bool:
    """The published chip rule: no label pixel is a no-data code and no pixel has all bands 0; nor, when the
    image declares a no-data value, all bands at that value (the pixels ``test.py`` writes as nodata).

    Args:
        raw_label: ``(S, S)`` raw label codes.
        image: ``(bands, S, S)`` raw pixels, or None to check the label only.
        nodata: the raw no-data codes of the label product.
        image_nodata: the image's declared no-data value (None: none).
    """
    if len(nodata) and np.isin(raw_label, nodata).any():
        return False
    return image is None or not blank_pixels(image, image_nodata).any()


class ChipStream(torch.utils.data.IterableDataset):
    """Random training chips of a tile list, sharded over ranks and loader workers.

    Args:
        entries: the tiles (image and LR label paths).
        dataset: definition giving the LR label table and its no-data codes.
        chip_size: chip side in pixels.
        chips_per_tile: positions drawn per tile per epoch.
        batch_size: chips per batch.
        seed: base seed of every random draw.
        rank, world_size: this process among the distributed ones.
        retries: extra positions drawn in place of an invalid chip (0 = published behaviour).
        with_codes: also yield the raw LR codes of each chip (for ``--label_loss mix``).
        min_batch: smallest last batch a worker emits.
        focus_points: per tile, ``(K, 2)`` ``(row, col)`` pixels (or None) that a share ``focus_share`` of
            its chips is centred on (:func:`training.sampling.centre_on_points`); None for uniform chips.
    """

    def __init__(self, entries: Sequence[TileEntry], dataset: DatasetDefinition, *, chip_size: int,
                 chips_per_tile: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 retries: int = 0, min_batch: int = 2, with_codes: bool = False,
                 focus_points: Sequence[np.ndarray | None] | None = None, focus_share: float = 0.0) -> None:
        super().__init__()
        if batch_size < min_batch:
            raise ValueError(f"batch_size {batch_size} is below the smallest batch {min_batch}")
        self.entries = list(entries)
        self.table = dataset.lr_label
        self.nodata = tuple(dataset.lr_label.nodata)
        self.chip_size = int(chip_size)
        self.chips_per_tile = int(chips_per_tile)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.retries = int(retries)
        self.with_codes = bool(with_codes)
        self.min_batch = int(min_batch)
        if focus_points is not None and len(focus_points) != len(self.entries):
            raise ValueError(f"focus_points: {len(focus_points)} entries for {len(self.entries)} tiles")
        self.focus_points = focus_points
        self.focus_share = float(focus_share)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose tile order and chip positions the next iteration produces."""
        self.epoch = int(epoch)

    def my_tiles(self, worker: int, num_workers: int) -> np.ndarray:
        """Tile indices this (rank, worker) reads in the current epoch, in reading order."""
        order = epoch_order(len(self.entries), self.seed, self.epoch)
        return shard(order, rank=self.rank, world_size=self.world_size, worker=worker, num_workers=num_workers)

    def __iter__(self) -> Iterator[StreamItem]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pending: list[tuple[np.ndarray, np.ndarray, tuple[int, int, int], np.ndarray]] = []
        skipped = 0
        for index in self.my_tiles(worker, num_workers):
            try:
                chips, tile_skipped, notice = self.read_tile(int(index))
            except InputError as exc:
                yield StreamError(str(exc))
                return
            skipped += tile_skipped
            if notice:
                yield TileNotice(int(index), notice)
            for chip in chips:
                pending.append(chip)
                if len(pending) == self.batch_size:
                    yield self.collate(pending, skipped)
                    pending, skipped = [], 0
        dropped = 0
        if len(pending) >= self.min_batch:
            yield self.collate(pending, skipped)
            skipped = 0
        else:
            dropped = len(pending)
        yield WorkerDone(skipped, dropped)

    def read_tile(self, index: int) -> tuple[list, int, str | None]:
        """Read the valid chips of tile ``index`` for the current epoch.

        Returns:
            (chips, number skipped, notice or None); each chip is (image, class indices,
            (tile, row, col)).

        Raises:
            InputError: unreadable file, size mismatch, or label codes outside the table.
        """
        entry = self.entries[index]
        size = self.chip_size
        rng = tile_rng(self.seed, self.epoch, index)
        with open_raster(entry.image, "image") as image_src, open_raster(entry.label, "label") as label_src:
            check_same_grid(image_src, label_src, check_georef=False)
            height, width = image_src.height, image_src.width
            if height < size or width < size:
                return [], 0, f"{entry.image}: tile {width}x{height} is smaller than a {size} chip; skipped"
            chips, skipped = [], 0
            positions = chip_positions(height, width, size, self.chips_per_tile, rng)
            points = self.focus_points[index] if self.focus_points is not None else None
            if points is not None:
                positions = centre_on_points(positions, points, self.focus_share, size, height, width,
                                             focus_rng(self.seed, self.epoch, index))
            for row, col in positions:
                chip = self._read_chip(image_src, label_src, int(row), int(col))
                for _ in range(self.retries):
                    if chip is not None:
                        break
                    row, col = chip_positions(height, width, size, 1, rng)[0]
                    chip = self._read_chip(image_src, label_src, int(row), int(col))
                if chip is None:
                    skipped += 1
                    continue
                image, label, raw = chip
                chips.append((image, label, (index, int(row), int(col)), raw))
        notice = None
        if not chips and self.chips_per_tile > 0:
            notice = f"{entry.image}: no valid chip (no-data label or all-zero pixels) in epoch {self.epoch}; skipped"
        return chips, skipped, notice

    def _read_chip(self, image_src, label_src, row: int, col: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        window = Window(col, row, self.chip_size, self.chip_size)
        raw = read_window(label_src, window, bands=[1])[0]
        if not chip_is_valid(raw, None, self.nodata):
            return None
        image = read_window(image_src, window)
        if not chip_is_valid(raw, image, (), image_src.nodata):
            return None
        if image.dtype.name not in TORCH_PIXEL_TYPES:
            image = image.astype(np.float32)
        return image, self.table.map(raw, source=label_src.name), raw

    def collate(self, chips: list, skipped: int) -> ChipBatch:
        """Stack chips into a :class:`ChipBatch`."""
        return ChipBatch(
            image=torch.from_numpy(np.stack([c[0] for c in chips])),
            label=torch.from_numpy(np.stack([c[1] for c in chips])),
            chips=torch.tensor([c[2] for c in chips], dtype=torch.int64),
            skipped=int(skipped),
            codes=torch.from_numpy(np.stack([c[3] for c in chips]).astype(np.int32)) if self.with_codes else None,
        )


def code_pixels(path: str, codes: Sequence[int], limit: int, rng: np.random.Generator,
                strip_rows: int = STRIP_ROWS) -> np.ndarray:
    """Up to ``limit`` ``(row, col)`` pixels of label raster ``path`` whose code is one of ``codes``,
    a uniform draw without replacement among all of them (``(0, 2)`` int64 when there is none).

    The label is read in strips of ``strip_rows`` rows; each matching pixel gets a random key and the
    ``limit`` smallest keys are kept, so the draw is uniform over the tile whatever its size.

    Raises:
        InputError: the file cannot be opened or read.
    """
    wanted = np.asarray(sorted(set(int(c) for c in codes)))
    keys, points = np.zeros(0), np.zeros((0, 2), dtype=np.int64)
    with open_raster(path, "label") as src:
        for top, band in read_strips(src, strip_rows):
            row, col = np.nonzero(np.isin(band, wanted))
            keys = np.concatenate([keys, rng.random(len(row))])
            points = np.concatenate([points, np.stack([row + top, col], axis=1).astype(np.int64)])
            if len(keys) > limit:
                keep = np.argpartition(keys, limit)[:limit]
                keys, points = keys[keep], points[keep]
    return points


def normalization_constants(mean: Sequence[float], std: Sequence[float],
                            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``scale = 1/std`` and ``shift = -mean/std`` per band, formed in float64 on the host and
    returned as float32 ``(1, bands, 1, 1)`` tensors on ``device``."""
    std64 = np.asarray(std, dtype=np.float64)
    scale = torch.from_numpy((1.0 / std64).astype(np.float32)).view(1, -1, 1, 1)
    shift = torch.from_numpy((-np.asarray(mean, dtype=np.float64) / std64).astype(np.float32)).view(1, -1, 1, 1)
    return scale.to(device), shift.to(device)


def normalize_on_device(image: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-band ``(x - mean) / std`` as ``x * scale + shift`` in float32 on the image's device
    (docs/design.md §2; matches the float64 reference of ``dataset.raster_io.normalize`` to float32
    rounding).

    Args:
        image: ``(B, bands, H, W)`` raw pixels (any numeric dtype).
        scale, shift: from :func:`normalization_constants`.

    Returns:
        float32 ``(B, bands, H, W)`` in the image's (contiguous) memory layout. In-place ops keep
        it: an out-of-place broadcast with the ``(1, bands, 1, 1)`` constants may return a
        channels-last tensor, which sends the whole network down slow CPU kernels.
    """
    return image.to(torch.float32, copy=True).mul_(scale).add_(shift)
