"""Training chip sampling as pure functions: chip positions, per-epoch shuffling, sharding.

Nothing here opens a file. Every random draw comes from an explicit NumPy generator derived from
``(seed, epoch, ...)`` (docs/design.md §10, defects 7-9), never from a global RNG:

* the tile order of an epoch is a permutation drawn from ``(seed, epoch)``, the same in every
  process, so ranks and loader workers agree on it without communicating;
* the order is dealt out round-robin over ``world_size * num_workers`` shards, one per (rank,
  worker): the shards are disjoint and together cover every tile once per epoch;
* the chip positions of a tile are drawn from ``(seed, epoch, tile index)``. A tile therefore gets
  the same chips in an epoch whichever worker or rank reads it, and different chips every epoch.
"""

from __future__ import annotations

import numpy as np

# Domain tags keep the streams of different purposes apart for the same (seed, epoch).
_ORDER_STREAM = 0
_CHIP_STREAM = 1
_FOCUS_STREAM = 2


def make_rng(seed: int, *keys: int) -> np.random.Generator:
    """Return a NumPy generator seeded from ``(seed, *keys)`` (all non-negative integers)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(int(k) for k in keys)]))


def epoch_order(num_tiles: int, seed: int, epoch: int) -> np.ndarray:
    """Tile indices of one epoch, shuffled from ``(seed, epoch)``.

    Returns:
        int64 array, a permutation of ``range(num_tiles)``.
    """
    return make_rng(seed, _ORDER_STREAM, epoch).permutation(num_tiles).astype(np.int64)


def shard_id(rank: int, worker: int, num_workers: int) -> int:
    """Index of the (rank, worker) shard among ``world_size * num_workers`` shards."""
    return rank * max(1, num_workers) + worker


def shard(order: np.ndarray, *, rank: int, world_size: int, worker: int, num_workers: int) -> np.ndarray:
    """The part of ``order`` that loader ``worker`` of process ``rank`` reads.

    Shard ``s`` of ``n = world_size * max(1, num_workers)`` takes ``order[s::n]``: the shards are
    disjoint, cover ``order`` exactly once and differ in length by at most one tile.

    Args:
        order: the epoch's tile order (same in every process).
        rank, world_size: this process and the number of processes (1 without distribution).
        worker, num_workers: this loader worker and the number of workers (0 workers means the
            main process reads, as worker 0 of 1).
    """
    workers = max(1, num_workers)
    if not 0 <= rank < world_size or not 0 <= worker < workers:
        raise ValueError(f"shard: rank {rank}/{world_size}, worker {worker}/{workers} out of range")
    return order[shard_id(rank, worker, workers)::world_size * workers]


def chip_positions(height: int, width: int, chip: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``count`` chip offsets uniformly over the full valid range (docs/design.md §6.3, defect 9 fixed).

    Both bounds are inclusive: ``row`` in ``[0, height - chip]`` and ``col`` in ``[0, width - chip]``,
    so the last row and column of the tile can be sampled and a tile exactly one chip wide works.

    Returns:
        int64 array ``(count, 2)`` of ``(row, col)`` pixel offsets of the chips' top-left corners;
        ``(0, 2)`` when the tile is smaller than a chip.
    """
    if height < chip or width < chip or count <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    rows = rng.integers(0, height - chip, size=count, endpoint=True)
    cols = rng.integers(0, width - chip, size=count, endpoint=True)
    return np.stack([rows, cols], axis=1).astype(np.int64)


def tile_rng(seed: int, epoch: int, tile_index: int) -> np.random.Generator:
    """Generator for the chips of tile ``tile_index`` (its row in the list) in ``epoch``."""
    return make_rng(seed, _CHIP_STREAM, epoch, tile_index)


def focus_rng(seed: int, epoch: int, tile_index: int) -> np.random.Generator:
    """Generator of the focus draws of tile ``tile_index`` in ``epoch`` (a stream apart from
    :func:`tile_rng`, so the uniform chip draws stay those of a run without focus)."""
    return make_rng(seed, _FOCUS_STREAM, epoch, tile_index)


def centre_on_points(positions: np.ndarray, points: np.ndarray, share: float, chip: int, height: int, width: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Chip offsets with each one, with probability ``share``, moved so that the chip is centred on a
    random one of ``points`` (clipped to the tile).

    Args:
        positions: ``(N, 2)`` int64 chip offsets (:func:`chip_positions`).
        points: ``(K, 2)`` ``(row, col)`` pixels to centre chips on; none leaves ``positions`` as they are.
        share: the probability, in [0, 1].
        chip, height, width: chip side and tile size in pixels (the tile is at least a chip).

    Returns:
        A new ``(N, 2)`` int64 array.
    """
    out = positions.copy()
    if len(points) == 0 or len(out) == 0 or share <= 0:
        return out
    moved = np.nonzero(rng.random(len(out)) < share)[0]
    centres = np.asarray(points, dtype=np.int64)[rng.integers(0, len(points), size=len(moved))]
    out[moved, 0] = np.clip(centres[:, 0] - chip // 2, 0, height - chip)
    out[moved, 1] = np.clip(centres[:, 1] - chip // 2, 0, width - chip)
    return out


def batches_from_chips(num_chips: int, batch_size: int, min_batch: int = 2) -> int:
    """Batches one worker forms from ``num_chips`` chips: full batches, then the remainder if it
    has at least ``min_batch`` chips (a 1-chip batch never reaches BatchNorm)."""
    full, rest = divmod(num_chips, batch_size)
    return full + (1 if rest >= min_batch else 0)


def steps_per_epoch(num_tiles: int, chips_per_tile: int, batch_size: int, world_size: int = 1,
                    num_workers: int = 0, min_batch: int = 2) -> int:
    """Optimiser steps of one epoch when no chip is skipped: an upper bound, exact on clean data.

    Each (rank, worker) shard forms its own batches (:func:`batches_from_chips`). A distributed
    epoch stops as soon as one rank runs out of batches, so the count is the minimum over ranks
    of the sum over that rank's workers.
    """
    workers = max(1, num_workers)
    shards = world_size * workers
    per_rank = []
    for rank in range(world_size):
        total = 0
        for worker in range(workers):
            tiles = len(range(shard_id(rank, worker, workers), num_tiles, shards))
            total += batches_from_chips(tiles * chips_per_tile, batch_size, min_batch)
        per_rank.append(total)
    return min(per_rank)


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """Poly schedule: the learning rate of optimiser step ``step`` (0-based) is
    ``base_lr * (1 - step / total_steps) ** power``, never below 0 (docs/design.md §6.5, defect 6 fixed:
    ``total_steps`` counts optimiser steps, not chips)."""
    if total_steps <= 0:
        return base_lr
    return base_lr * max(0.0, 1.0 - step / total_steps) ** power


def published_lr(base_lr: float, batch_size: int) -> float:
    """The published learning-rate scaling (docs/design.md §6.5): ``base_lr * batch / 24`` when the batch is
    a multiple of 6 other than 24, else ``base_lr`` unchanged. Uses the per-process batch."""
    if batch_size % 6 == 0 and batch_size != 24:
        return base_lr * batch_size / 24
    return base_lr


__all__ = [
    "batches_from_chips",
    "centre_on_points",
    "chip_positions",
    "epoch_order",
    "focus_rng",
    "make_rng",
    "poly_lr",
    "published_lr",
    "shard",
    "shard_id",
    "steps_per_epoch",
    "tile_rng",
]
