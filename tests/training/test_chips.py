"""ChipStream: windowed chip reads, the no-data rule, batching, sharding over workers and ranks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dataset import TileEntry, load_dataset, read_list
from dataset.errors import InputError
from dataset.raster_io import normalize
from tests.helpers import SAMPLE_LIST, write_geotiff
from training.chips import (
    ChipBatch,
    ChipStream,
    StreamError,
    TileNotice,
    WorkerDone,
    chip_is_valid,
    code_pixels,
    normalization_constants,
    normalize_on_device,
)

SAMPLE = load_dataset("sample")


def make_tile(folder, name, size=(96, 96), label_code=41, image=None, label=None):
    """A 4-band uint8 image and an NLCD label of one code (or the given arrays)."""
    given = label if label is not None else (image[0] if image is not None else None)
    h, w = given.shape if given is not None else size
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    if image is None:
        image = rng.integers(1, 255, (4, h, w), dtype=np.uint8)
    if label is None:
        label = np.full((h, w), label_code, dtype=np.uint8)
    img = write_geotiff(os.path.join(folder, f"{name}_naip.tif"), image)
    lab = write_geotiff(os.path.join(folder, f"{name}_nlcd.tif"), label)
    return TileEntry(img, lab)


def stream(entries, **kw):
    args = dict(chip_size=32, chips_per_tile=4, batch_size=2, seed=1234)
    args.update(kw)
    return ChipStream(entries, SAMPLE, **args)


def batches(items):
    return [b for b in items if isinstance(b, ChipBatch)]


def chips_of(items):
    return [tuple(c) for b in batches(items) for c in b.chips.tolist()]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiles"))
    return [make_tile(folder, f"t{i}", size=(64 + 8 * i, 80)) for i in range(6)]


def test_chip_rule():
    label = np.full((4, 4), 41)
    image = np.ones((4, 4, 4))
    assert chip_is_valid(label, image, (0,))
    label[1, 2] = 0
    assert not chip_is_valid(label, image, (0,))
    label[1, 2] = 41
    image[:, 3, 3] = 0
    assert not chip_is_valid(label, image, (0,))
    image[0, 3, 3] = 5  # one band non-zero: valid
    assert chip_is_valid(label, image, (0,))
    # an image that declares a no-data value: pixels with every band at it are no data too
    image[:, 0, 0] = 255
    assert chip_is_valid(label, image, (0,)) and not chip_is_valid(label, image, (0,), 255.0)
    image[2, 0, 0] = 7
    assert chip_is_valid(label, image, (0,), 255.0)
    image[:, 1, 1] = np.nan
    assert chip_is_valid(label, image, (0,), 255.0) and not chip_is_valid(label, image, (0,), float("nan"))


def test_batches_shapes_types_and_positions(tiles):
    items = list(stream(tiles))
    out = batches(items)
    assert len(out) == 6 * 4 // 2
    for b in out:
        assert b.image.shape == (2, 4, 32, 32) and b.image.dtype == torch.uint8
        assert b.label.shape == (2, 32, 32) and b.label.dtype == torch.uint8
        assert set(b.label.unique().tolist()) == {2}  # NLCD 41 -> tree canopy
    # Each chip equals the windowed read at its recorded position.
    import rasterio

    b = out[0]
    tile, row, col = b.chips[0].tolist()
    with rasterio.open(tiles[tile].image) as src:
        full = src.read()
    assert np.array_equal(b.image[0].numpy(), full[:, row:row + 32, col:col + 32])
    assert items[-1] == WorkerDone(skipped=0, dropped=0)


def test_same_seed_same_chips_new_epoch_new_chips(tiles):
    a, b = stream(tiles), stream(tiles)
    assert chips_of(a) == chips_of(b)
    b.set_epoch(1)
    assert chips_of(a) != chips_of(b)
    assert chips_of(a) != chips_of(stream(tiles, seed=1))


def test_ranks_and_workers_read_disjoint_tiles_covering_the_list(tiles):
    world, workers = 2, 2
    seen = {}
    for rank in range(world):
        s = stream(tiles, rank=rank, world_size=world)
        loader = torch.utils.data.DataLoader(s, batch_size=None, num_workers=workers)
        seen[rank] = chips_of(loader)
    tiles_of = {r: {c[0] for c in seen[r]} for r in seen}
    assert not tiles_of[0] & tiles_of[1]
    assert tiles_of[0] | tiles_of[1] == set(range(len(tiles)))
    # Chip positions do not depend on who reads a tile: same chips as one process, one worker.
    assert sorted(seen[0] + seen[1]) == sorted(chips_of(stream(tiles)))


def test_nodata_and_zero_pixels_are_skipped(tmp_path):
    label = np.full((64, 64), 41, dtype=np.uint8)
    label[:, :8] = 0  # no-data strip
    image = np.full((4, 64, 64), 100, dtype=np.uint8)
    image[:, 60:, 60:] = 0  # all-zero pixels in a corner
    entry = make_tile(str(tmp_path), "holes", image=image, label=label)
    items = list(stream([entry], chips_per_tile=200, batch_size=4))
    got = chips_of(items)
    assert got, "some chips are valid"
    for _, row, col in got:
        assert col >= 8 and not (row + 32 > 60 and col + 32 > 60)
    skipped = sum(i.skipped for i in items if isinstance(i, (ChipBatch, WorkerDone)))
    assert skipped > 0 and len(got) + skipped + items[-1].dropped == 200


def test_retries_replace_invalid_chips(tmp_path):
    label = np.full((64, 64), 41, dtype=np.uint8)
    label[:, :16] = 0
    entry = make_tile(str(tmp_path), "half", label=label)
    plain = len(chips_of(stream([entry], chips_per_tile=40, batch_size=2)))
    retried = len(chips_of(stream([entry], chips_per_tile=40, batch_size=2, retries=20)))
    assert plain < 40 and retried == 40


def test_small_and_empty_tiles_are_reported_not_fatal(tmp_path):
    small = make_tile(str(tmp_path), "small", size=(20, 80))
    empty = make_tile(str(tmp_path), "empty", label_code=0)
    good = make_tile(str(tmp_path), "good")
    items = list(stream([small, empty, good]))
    notices = {i.tile: i.message for i in items if isinstance(i, TileNotice)}
    assert set(notices) == {0, 1}
    assert "smaller than a 32 chip" in notices[0] and small.image in notices[0]
    assert "no valid chip" in notices[1]
    assert {c[0] for c in chips_of(items)} == {2}


def test_chips_skip_the_image_s_declared_nodata(tmp_path):
    """Chips that hold a pixel at the image's declared no-data value in every band are skipped, as all-zero
    ones are (the pixels test.py writes as nodata); the same image without the declaration trains."""
    image = np.random.default_rng(0).integers(1, 250, (4, 64, 64), dtype=np.uint8)
    image[:, :, 30:34] = 255  # a fill column that every 32-chip of a 64-wide tile touches
    label = np.full((64, 64), 41, dtype=np.uint8)
    declared = make_tile(str(tmp_path), "declared", image=image, label=label)
    write_geotiff(declared.image, image, nodata=255)
    undeclared = make_tile(str(tmp_path), "undeclared", image=image, label=label)
    items = list(stream([declared, undeclared], chips_per_tile=8))
    assert {c[0] for c in chips_of(items)} == {1}
    assert "no valid chip" in {i.tile: i.message for i in items if isinstance(i, TileNotice)}[0]


def test_one_chip_remainder_is_dropped(tmp_path):
    entry = make_tile(str(tmp_path), "odd")
    items = list(stream([entry], chips_per_tile=5, batch_size=2))
    assert [len(b.chips) for b in batches(items)] == [2, 2]
    assert items[-1].dropped == 1
    items = list(stream([entry], chips_per_tile=5, batch_size=3))
    assert [len(b.chips) for b in batches(items)] == [3, 2]
    with pytest.raises(ValueError):
        stream([entry], batch_size=1)


def test_unknown_label_code_is_an_error_naming_file_and_codes(tmp_path):
    label = np.full((64, 64), 41, dtype=np.uint8)
    label[10:50, 10:50] = 250
    entry = make_tile(str(tmp_path), "bad", label=label)
    items = list(stream([entry], chips_per_tile=20))
    errors = [i.message for i in items if isinstance(i, StreamError)]
    assert len(errors) == 1 and entry.label in errors[0] and "[250]" in errors[0]


def test_real_sample_chips():
    entries = read_list(SAMPLE_LIST)
    items = list(stream(entries, chip_size=224, chips_per_tile=2, batch_size=2))
    out = batches(items)
    assert len(out) == 8
    for b in out:
        assert b.image.shape == (2, 4, 224, 224)
        assert set(b.label.unique().tolist()) <= {1, 2, 3, 4}


def test_code_pixels_draws_uniformly_among_the_pixels_of_the_codes(tmp_path):
    strips = {"strip_rows": 7}  # many strips of rows, merged as they are read
    label = np.full((60, 50), 41, dtype=np.uint8)
    label[:5, :] = 21  # 250 pixels at the top
    label[50:55, :] = 22  # 250 near the bottom
    label[30, 7] = 24
    path = make_tile(str(tmp_path), "coded", label=label).label
    every = code_pixels(path, [21, 22, 24], 10_000, np.random.default_rng(0), **strips)
    assert every.dtype == np.int64 and sorted(map(tuple, every.tolist())) == sorted(zip(*np.nonzero(label != 41)))
    drawn = code_pixels(path, [21, 22], 100, np.random.default_rng(0), **strips)
    assert len(drawn) == len({tuple(p) for p in drawn.tolist()}) == 100
    assert np.isin(label[drawn[:, 0], drawn[:, 1]], [21, 22]).all()
    top = int((drawn[:, 0] < 5).sum())
    assert 30 <= top <= 70  # the two halves in proportion (a draw among all 500, not the first band read)
    assert np.array_equal(drawn, code_pixels(path, [22, 21], 100, np.random.default_rng(0), **strips))
    assert code_pixels(path, [23], 100, np.random.default_rng(0)).shape == (0, 2)
    with pytest.raises(InputError, match="missing.tif: label not found"):
        code_pixels(str(tmp_path / "missing.tif"), [21], 100, np.random.default_rng(0))


def test_normalize_on_device_matches_float64_reference():
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 4, 8, 8), dtype=np.uint8))
    scale, shift = normalization_constants(SAMPLE.mean, SAMPLE.std)
    got = normalize_on_device(image, scale, shift)
    ref = normalize(image.numpy(), SAMPLE.mean, SAMPLE.std)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=2e-6)
