"""Pure sampling functions: chip positions, epoch shuffles, sharding, batch counts, LR schedule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from training.sampling import (
    batches_from_chips,
    centre_on_points,
    chip_positions,
    epoch_order,
    focus_rng,
    make_rng,
    poly_lr,
    published_lr,
    shard,
    steps_per_epoch,
    tile_rng,
)


@pytest.mark.parametrize("height,width,chip", [(256, 256, 224), (300, 260, 64), (64, 64, 64), (97, 500, 32)])
def test_chip_positions_inside_and_cover_full_range(height, width, chip):
    pos = chip_positions(height, width, chip, 4000, make_rng(1))
    assert pos.shape == (4000, 2) and pos.dtype == np.int64
    assert pos[:, 0].min() == 0 and pos[:, 0].max() == height - chip  # last offset reachable (defect 9)
    assert pos[:, 1].min() == 0 and pos[:, 1].max() == width - chip
    if height - chip + 1 <= 300:  # ~13+ draws per offset: every offset appears
        assert np.bincount(pos[:, 0], minlength=height - chip + 1).min() > 0


def test_chip_positions_small_tiles():
    assert chip_positions(223, 500, 224, 50, make_rng(0)).shape == (0, 2)
    assert chip_positions(500, 100, 224, 50, make_rng(0)).shape == (0, 2)
    exact = chip_positions(224, 224, 224, 5, make_rng(0))
    assert exact.tolist() == [[0, 0]] * 5
    assert chip_positions(500, 500, 224, 0, make_rng(0)).shape == (0, 2)


def test_centre_on_points_moves_a_share_of_the_chips_onto_the_points():
    uniform = chip_positions(300, 200, 64, 2000, make_rng(3))
    points = np.array([[150, 100], [5, 190], [299, 0]])
    moved = centre_on_points(uniform, points, 0.25, 64, 300, 200, focus_rng(3, 0, 0))
    changed = (moved != uniform).any(axis=1)
    assert 0.2 < changed.mean() < 0.3
    targets = {(118, 68), (0, 136), (236, 0)}  # each point's centred chip, clipped to the 300 x 200 tile
    assert {tuple(p) for p in moved[changed].tolist()} == targets
    assert np.array_equal(uniform, chip_positions(300, 200, 64, 2000, make_rng(3)))  # input untouched
    assert np.array_equal(moved, centre_on_points(uniform, points, 0.25, 64, 300, 200, focus_rng(3, 0, 0)))
    assert not np.array_equal(moved, centre_on_points(uniform, points, 0.25, 64, 300, 200, focus_rng(3, 1, 0)))
    everywhere = centre_on_points(uniform, points, 1.0, 64, 300, 200, focus_rng(3, 0, 0))
    assert {tuple(p) for p in everywhere.tolist()} == targets
    for share, pts in ((0.0, points), (1.0, np.zeros((0, 2), dtype=np.int64))):
        assert np.array_equal(centre_on_points(uniform, pts, share, 64, 300, 200, focus_rng(3, 0, 0)), uniform)


def test_epoch_order_is_seeded_permutation():
    a = epoch_order(100, seed=1234, epoch=0)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(100, seed=1234, epoch=0))
    assert not np.array_equal(a, epoch_order(100, seed=1234, epoch=1))
    assert not np.array_equal(a, epoch_order(100, seed=1, epoch=0))


def test_tile_rng_differs_by_epoch_and_tile_and_repeats_by_seed():
    draw = lambda *k: chip_positions(5000, 5000, 224, 8, tile_rng(*k)).tolist()  # noqa: E731
    assert draw(1234, 0, 3) == draw(1234, 0, 3)
    assert draw(1234, 0, 3) != draw(1234, 1, 3)
    assert draw(1234, 0, 3) != draw(1234, 0, 4)
    assert draw(1234, 0, 3) != draw(99, 0, 3)


@pytest.mark.parametrize("num_tiles,world,workers", [(100, 1, 8), (100, 2, 8), (7, 3, 2), (5, 2, 4), (1, 1, 0)])
def test_shards_are_disjoint_and_cover(num_tiles, world, workers):
    order = epoch_order(num_tiles, 7, 3)
    parts = [shard(order, rank=r, world_size=world, worker=w, num_workers=workers)
             for r in range(world) for w in range(max(1, workers))]
    seen = np.concatenate(parts)
    assert sorted(seen.tolist()) == list(range(num_tiles))  # each tile exactly once per epoch
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for a, b in itertools.combinations(parts, 2):
        assert not set(a.tolist()) & set(b.tolist())


def test_shard_rejects_bad_rank():
    with pytest.raises(ValueError):
        shard(np.arange(4), rank=2, world_size=2, worker=0, num_workers=1)


def test_published_shuffle_defect_is_fixed():
    """Every tile is visited once per epoch and the visited order changes with the epoch (defect 7)."""
    firsts = set()
    for epoch in range(5):
        parts = [shard(epoch_order(100, 1234, epoch), rank=0, world_size=1, worker=w, num_workers=8)
                 for w in range(8)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(100))
        firsts.add(tuple(parts[5][:3].tolist()))  # worker 5 no longer reads fixed CSV rows
    assert len(firsts) == 5


def test_batch_counts():
    assert batches_from_chips(50, 2) == 25
    assert batches_from_chips(51, 2) == 25  # a 1-chip remainder is dropped
    assert batches_from_chips(50, 4) == 13  # 12 full + a 2-chip batch
    assert batches_from_chips(49, 4) == 12
    assert batches_from_chips(1, 2) == 0
    # 100 tiles x 50 chips, batch 4, 8 workers: shards of 13 tiles (4 of them) and 12 tiles (4).
    assert steps_per_epoch(100, 50, 4, world_size=1, num_workers=8) == 4 * 163 + 4 * 150
    assert steps_per_epoch(100, 50, 4, world_size=1, num_workers=0) == 1250
    # Two ranks stop together: the poorer rank decides.
    assert steps_per_epoch(3, 3, 2, world_size=2, num_workers=0) == 1


def test_poly_schedule_anneals_over_optimizer_steps():
    total = 1000
    lrs = [poly_lr(0.01, t, total) for t in range(total)]
    assert lrs[0] == 0.01
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert 0 < lrs[-1] < 0.01 * 2e-3  # anneals to ~0, unlike the published 0.0054 (defect 6)
    assert poly_lr(0.01, total, total) == 0.0
    assert poly_lr(0.01, total + 5, total) == 0.0  # clamped, never negative or complex
    assert poly_lr(0.01, 500, 1000) == pytest.approx(0.01 * 0.5**0.9)


def test_published_lr_scaling():
    assert published_lr(0.01, 2) == 0.01
    assert published_lr(0.01, 4) == 0.01
    assert published_lr(0.01, 24) == 0.01
    assert published_lr(0.01, 12) == pytest.approx(0.005)
    assert published_lr(0.01, 6) == pytest.approx(0.0025)
    assert published_lr(0.01, 48) == pytest.approx(0.02)
