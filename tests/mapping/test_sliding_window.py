"""Sliding-window mapping (docs/design.md §7): grid, kernel, strip-wise stitching, GeoTIFF output, resume, bad input.

Most tests use a two-convolution stand-in for the network (any callable returning
``(vit_logits, cnn_logits)`` will do); the tests at the end use a tiny VCNet checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import threading

import numpy as np
import pytest
import rasterio
import torch

from dataset import load_dataset
from dataset.errors import InputError
from dataset.raster_io import normalize
from mapping.guided_filter import guided_filter
from mapping.sliding_window import (
    BandNormaliser,
    _chip_rows,
    _class_map,
    _one_thread,
    center_kernel,
    chip_offsets,
    iter_class_strips,
    iter_probability_strips,
)
from mapping.writer import map_tile, output_name, probs_name
from tests.helpers import GEOREF_DIR, write_geotiff

NAIP_260 = os.path.join(GEOREF_DIR, "m_3907833_nw_17_1_naip-new.tif")  # 260 x 260, EPSG:26917
NAIP_266x204 = os.path.join(GEOREF_DIR, "m_3211605_ne_11_060_20200415.tif")  # EPSG:26911, 0.6 m
NAIP_175x143 = os.path.join(GEOREF_DIR, "m_4208701_ne_16_060_20200902.tif")  # EPSG:26916, 0.6 m


class TwoConv(torch.nn.Module):
    """Stand-in network: (vit, cnn) logits from two small convolutions."""

    def __init__(self, bands: int = 4, classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.vit = torch.nn.Conv2d(bands, classes, 3, padding=1)
        self.cnn = torch.nn.Conv2d(bands, classes, 5, padding=2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.vit(x), self.cnn(x)


class FailAfter(TwoConv):
    """Raises ``error`` on forward call number ``calls + 1`` (simulates an interrupted run)."""

    def __init__(self, calls: int, error: BaseException):
        super().__init__()
        self.limit, self.error = calls, error

    def forward(self, x):
        if self.calls >= self.limit:
            raise self.error
        return super().forward(x)


def oracle_offsets(size: int, chip: int, stride: int) -> list[int]:
    """Grid offsets written out from docs/design.md §7 (not taken from the module under test): every
    ``stride`` from 0 while below ``size - chip``, then ``size - chip``; 0 alone if the side fits."""
    if size <= chip:
        return [0]
    offsets = []
    position = 0
    while position < size - chip:
        offsets.append(position)
        position += stride
    offsets.append(size - chip)
    return offsets


def oracle_kernel(chip: int, stride: int) -> np.ndarray:
    """Blending weights written out from docs/design.md §7: 5 in the central ``[m, chip - m)`` square with
    ``m = (chip - stride) // 2``, 1 elsewhere."""
    m = (chip - stride) // 2
    kernel = np.empty((chip, chip), dtype=np.float32)
    for i in range(chip):
        for j in range(chip):
            kernel[i, j] = 5.0 if (m <= i < chip - m and m <= j < chip - m) else 1.0
    return kernel


def whole_tile_oracle(model, image: np.ndarray, chip: int, stride: int, guided: int = 0) -> np.ndarray:
    """The published procedure with a whole-tile accumulator, one chip at a time (docs/design.md §7); with
    ``guided``, each chip's probabilities go through the guided filter, the chip as the guide, before blending."""
    _, h, w = image.shape
    hp, wp = max(h, chip), max(w, chip)
    image = np.pad(image, ((0, 0), (0, hp - h), (0, wp - w)), mode="reflect")
    kernel = oracle_kernel(chip, stride)
    acc, cnt = None, np.zeros((hp, wp), dtype=np.float32)
    for r in oracle_offsets(h, chip, stride):
        for c in oracle_offsets(w, chip, stride):
            chip_input = torch.from_numpy(np.ascontiguousarray(image[None, :, r:r + chip, c:c + chip]))
            with torch.no_grad():
                vit, cnn = model(chip_input)
            p = torch.softmax((vit + cnn) / 2, dim=1)
            if guided:
                p = guided_filter(chip_input, p, guided)
            p = p[0].numpy()
            if acc is None:
                acc = np.zeros((p.shape[0], hp, wp), dtype=np.float32)
            acc[:, r:r + chip, c:c + chip] += p * kernel
            cnt[r:r + chip, c:c + chip] += kernel
    return (acc / cnt)[:, :h, :w]


class Elementwise(torch.nn.Module):
    """Logits that are the same bits whatever the batch and the thread count."""

    def forward(self, x):
        return x[:, [0, 1, 2, 3, 0]] * 2, x[:, [1, 2, 3, 0, 1]] - 1


def strips_of(model, image, chip, stride, **kw):
    """Run the strip-wise mapper on an in-memory image; return (row, probs) list and read log."""
    reads = []

    def read_rows(r0, r1):
        reads.append((r0, r1))
        return image[:, r0:r1]

    out = list(iter_probability_strips(model, read_rows, image.shape[1], image.shape[2], chip_size=chip,
                                       stride=stride, **kw))
    return out, reads


@pytest.fixture(scope="module")
def sample_ds():
    return load_dataset("sample")


@pytest.fixture
def model():
    return TwoConv().eval()


def read_normalized(path, dataset):
    with rasterio.open(path) as src:
        return normalize(src.read(), dataset.mean, dataset.std)


# --- grid and kernel -------------------------------------------------------------------------


def test_chip_offsets_as_published():
    assert chip_offsets(448, 224, 112) == [0, 112, 224]
    assert chip_offsets(500, 224, 112) == [0, 112, 224, 276]  # last one flush with the border
    assert chip_offsets(225, 224, 112) == [0, 1]
    assert chip_offsets(224, 224, 112) == [0]
    assert chip_offsets(100, 224, 112) == [0]  # smaller than a chip: padded by the caller
    for size in range(1, 120):
        offsets = chip_offsets(size, 32, 16)
        assert offsets == sorted(set(offsets))  # increasing, no repeats
        assert offsets[-1] == max(size - 32, 0)
        assert all(b - a <= 16 for a, b in zip(offsets, offsets[1:]))  # no gaps
    with pytest.raises(ValueError):
        chip_offsets(100, 32, 33)
    with pytest.raises(ValueError):
        chip_offsets(100, 0, 1)


def test_oracle_grid_and_kernel_match_the_published_examples():
    """The test's own grid and kernel agree with the published 224/112 numbers."""
    assert oracle_offsets(500, 224, 112) == [0, 112, 224, 276]
    assert oracle_offsets(448, 224, 112) == [0, 112, 224] and oracle_offsets(100, 224, 112) == [0]
    k = oracle_kernel(224, 112)
    assert k[56, 56] == k[167, 167] == 5 and k[55, 100] == k[100, 168] == 1 and k.sum() == 224 * 224 + 4 * 112 * 112


def test_center_kernel_published_weights():
    k = center_kernel(224, 112)
    assert k.dtype == np.float32 and k.shape == (224, 224)
    inside = np.zeros((224, 224), dtype=bool)
    inside[56:168, 56:168] = True
    assert np.all(k[inside] == 5) and np.all(k[~inside] == 1)
    assert np.all(center_kernel(32, 16)[8:24, 8:24] == 5) and center_kernel(32, 16).sum() == 32 * 32 + 4 * 16 * 16


def test_output_names():
    assert output_name("/d/m_4207563_ne_18_1_naip-new.tif") == "m_4207563_ne_18_1_predictions-new.tif"
    assert output_name("x/wv_1m_2014-m_3708020_sw_17_1-0_naip.tif") == "wv_1m_2014-m_3708020_sw_17_1-0_predictions.tif"
    assert output_name("m_3211605_ne_11_060_20200415.tif") == "m_3211605_ne_11_060_20200415_pred.tif"
    assert probs_name("a_predictions.tif") == "a_predictions_probs.tif"


# --- strip-wise stitching equals the whole-tile accumulator ----------------------------------


@pytest.mark.parametrize("shape", [(100, 130), (64, 64), (20, 50), (97, 64), (300, 41), (1, 1)])
def test_strip_wise_equals_whole_tile(model, shape):
    image = np.random.default_rng(1).normal(size=(4, *shape)).astype(np.float32)
    expected = whole_tile_oracle(model, image, 32, 16)
    strips, reads = strips_of(model, image, 32, 16, batch_size=1)
    rows = [r for r, _ in strips]
    assert rows == sorted(rows) and rows[0] == 0
    got = np.concatenate([p for _, p in strips], axis=1)
    # Same float32 additions in the same order: bit-identical.
    np.testing.assert_array_equal(got, expected)
    # Memory: never more than one chip of rows read at a time, in order; each row read once.
    assert all(r1 - r0 <= 32 for r0, r1 in reads) and reads == sorted(reads)
    assert [r0 for r0, _ in reads] == [0] + [r1 for _, r1 in reads[:-1]] and reads[-1][1] == shape[0]


@pytest.mark.parametrize("chip, stride", [(32, 16), (32, 11), (32, 32), (64, 48)])
def test_overlapping_rows_are_read_once_and_give_the_same_bands(chip, stride):
    """Bands share ``chip - stride`` rows (more before the flush last one): those come from the previous band."""
    image = np.random.default_rng(6).normal(size=(4, 150, 40)).astype(np.float32)
    strips, reads = strips_of(Elementwise(), image, chip, stride, batch_size=3)
    np.testing.assert_array_equal(np.concatenate([p for _, p in strips], axis=1),
                                  whole_tile_oracle(Elementwise(), image, chip, stride))
    assert [r0 for r0, _ in reads] == [0] + [r1 for _, r1 in reads[:-1]] and reads[-1][1] == 150


def test_bands_for_cuda_are_the_raw_rows_each_read_once(monkeypatch):
    """The CUDA branch of the reader (raw uint8 rows in pinned memory, normalised on the device), run here with
    pinning made a no-op: each band holds exactly the image's rows, width-padded, and each row is read once."""
    real_empty = torch.empty
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    image = np.random.default_rng(7).integers(0, 256, size=(4, 100, 20), dtype=np.uint8)
    reads = []

    def read_rows(r0, r1):
        reads.append((r0, r1))
        return image[:, r0:r1]

    bands = list(_chip_rows(read_rows, 100, 20, 32, 11, torch.device("cuda"), normalise=None))
    assert [row for row, _ in bands] == chip_offsets(100, 32, 11)
    padded = np.pad(image, ((0, 0), (0, 0), (0, 12)), mode="reflect")
    for row, band in bands:
        assert band.dtype == torch.uint8
        np.testing.assert_array_equal(band.numpy(), padded[:, row:row + 32])
    assert [r0 for r0, _ in reads] == [0] + [r1 for _, r1 in reads[:-1]] and reads[-1][1] == 100


def test_guided_filter_filters_each_chip_before_blending(model):
    image = np.random.default_rng(4).normal(size=(4, 70, 90)).astype(np.float32)
    strips, _ = strips_of(model, image, 32, 16, batch_size=5, guided_filter=3)
    got = np.concatenate([p for _, p in strips], axis=1)
    np.testing.assert_allclose(got, whole_tile_oracle(model, image, 32, 16, guided=3), rtol=0, atol=1e-6)
    assert np.abs(got - whole_tile_oracle(model, image, 32, 16)).max() > 0.05


def test_halves_of_a_batch_in_two_threads_give_the_same_bits():
    """With more than one torch thread, stacking and weighting split each batch over two threads."""
    image = np.random.default_rng(3).normal(size=(4, 120, 100)).astype(np.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            strips, _ = strips_of(Elementwise(), image, 32, 16, batch_size=7)
            results.append(np.concatenate([p for _, p in strips], axis=1))
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[1], whole_tile_oracle(Elementwise(), image, 32, 16))


def test_batching_and_read_ahead_do_not_change_the_result(model):
    image = np.random.default_rng(2).normal(size=(4, 150, 90)).astype(np.float32)
    one, _ = strips_of(model, image, 32, 16, batch_size=1)
    many, _ = strips_of(model, image, 32, 16, batch_size=7, prefetch=3)
    np.testing.assert_allclose(np.concatenate([p for _, p in many], 1), np.concatenate([p for _, p in one], 1),
                               rtol=0, atol=1e-6)


def test_strips_are_released_before_the_tile_is_read():
    image = np.zeros((4, 320, 40), dtype=np.float32)
    events = []

    def read_rows(r0, r1):
        events.append(("read", r0))
        return image[:, r0:r1]

    for row, _ in iter_probability_strips(TwoConv().eval(), read_rows, 320, 40, chip_size=32, stride=16,
                                          batch_size=2):
        events.append(("strip", row))
    first_strip = events.index(("strip", 0))
    assert first_strip < len(events) // 4  # long before the last read
    assert events[-1][0] == "strip"


def test_read_error_in_read_ahead_thread_is_raised():
    def read_rows(r0, r1):
        if r0 >= 32:
            raise InputError("tile.tif: cannot read pixels (boom)")
        return np.zeros((4, r1 - r0, 40), dtype=np.float32)

    with pytest.raises(InputError, match="boom"):
        list(iter_probability_strips(TwoConv().eval(), read_rows, 200, 40, chip_size=32, stride=16, prefetch=2))


# --- the device pipeline: normalisation, uint8 outputs, threads --------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_normalisation_on_the_device_is_bit_identical_to_the_host(sample_ds, dtype):
    """uint8 goes through the lookup table, the rest through float64: both equal normalize()."""
    high = 256 if dtype == np.uint8 else 4000
    raw = np.random.default_rng(4).integers(0, high, size=(4, 30, 50)).astype(dtype)
    got = BandNormaliser(sample_ds.mean, sample_ds.std, torch.device("cpu"))(torch.from_numpy(raw))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), normalize(raw, sample_ds.mean, sample_ds.std))


class Ties(torch.nn.Module):
    """Classes 1 and 3 always get the same logits: argmax must pick the first, as np.argmax."""

    def forward(self, x):
        vit = torch.stack([x[:, 0], x[:, 1], x[:, 2], x[:, 1], x[:, 3] - 9], dim=1)
        return vit, vit.clone()


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("net", [TwoConv, Ties])
def test_class_strips_equal_argmax_and_rint_of_the_blended_probabilities(net, prefetch):
    model = net().eval()
    image = np.random.default_rng(5).normal(size=(4, 90, 70)).astype(np.float32)
    expected = whole_tile_oracle(model, image, 32, 16)
    strips = list(iter_class_strips(model, lambda r0, r1: image[:, r0:r1], 90, 70, chip_size=32, stride=16,
                                    batch_size=1, prefetch=prefetch, probabilities=True))
    assert [s.row for s in strips] == sorted(s.row for s in strips) and {s.num_classes for s in strips} == {5}
    classes = np.concatenate([s.classes for s in strips], axis=0)
    assert classes.dtype == np.uint8
    np.testing.assert_array_equal(classes, expected.argmax(0))
    np.testing.assert_array_equal(np.concatenate([s.probs for s in strips], axis=1), np.rint(expected * 255))
    if net is Ties:
        assert not (classes == 3).any() and (classes == 1).any()


class Cached(torch.nn.Module):
    """Returns the same output tensors at every call (as a model with cached outputs might)."""

    def __init__(self):
        super().__init__()
        self.vit, self.cnn = torch.randn(4, 5, 32, 32), torch.randn(4, 5, 32, 32)

    def forward(self, x):
        return self.vit[:len(x)], self.cnn[:len(x)]


def test_the_model_outputs_are_not_modified():
    model = Cached()
    vit, cnn = model.vit.clone(), model.cnn.clone()
    image = np.zeros((4, 64, 64), dtype=np.float32)
    list(iter_class_strips(model, lambda r0, r1: image[:, r0:r1], 64, 64, chip_size=32, stride=16, batch_size=4))
    assert torch.equal(model.vit, vit) and torch.equal(model.cnn, cnn)


def test_pipeline_work_runs_on_one_cpu_thread_and_restores_the_setting():
    seen = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _one_thread(lambda: seen.append(torch.get_num_threads()))()
        assert seen == [1] and torch.get_num_threads() == 2
        image = np.zeros((4, 64, 64), dtype=np.float32)
        model = TwoConv().eval()
        model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        list(iter_class_strips(model, lambda r0, r1: image[:, r0:r1], 64, 64, chip_size=32, stride=16))
        assert set(seen[1:]) == {2}, "the model keeps torch's thread setting"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("torch_threads, helpers", [(1, 0), (2, 1)])
def test_closing_early_stops_the_reading_and_computing_threads(torch_threads, helpers):
    """Reading and computing threads, and with more than one torch thread the helper that takes half of
    each batch: all stop when the caller closes the strips."""
    image = np.zeros((4, 400, 40), dtype=np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        before = threading.active_count()
        strips = iter_class_strips(TwoConv().eval(), lambda r0, r1: image[:, r0:r1], 400, 40, chip_size=32,
                                   stride=16, prefetch=2)
        next(strips)
        assert threading.active_count() == before + 2 + helpers
        strips.close()
        assert threading.active_count() == before
    finally:
        torch.set_num_threads(threads)


def test_class_map_on_the_cpu_is_numpy_s_argmax():
    """First maximum on ties; a NaN pixel (NaN in every class, as a softmax gives) is class 0."""
    rng = np.random.default_rng(8)
    probs = rng.integers(0, 4, size=(5, 60, 70)).astype(np.float32) / 4  # many ties
    probs[:, 3, 4] = np.nan
    got = _class_map(torch.from_numpy(probs))
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), np.argmax(probs, axis=0))


@pytest.mark.cuda
@pytest.mark.parametrize("amp, guided, vote", [(False, 0, 0), (True, 0, 0), (False, 4, 0), (False, 4, 1)])
def test_cuda_class_map_agrees_with_the_cpu(sample_ds, amp, guided, vote):
    """Same stand-in model on CUDA: identical map in float32 up to TF32 near-ties; bf16 close; the guided
    filter (its solves in float32 on either device) and a label model's vote as close as float32."""
    from networks.label_model import BaggedLabelModel, LabelModelVote

    model = TwoConv().eval()
    if vote:
        model = LabelModelVote(model, BaggedLabelModel.empty(4, 5, 2), vote).eval()
    raw = np.random.default_rng(6).integers(0, 256, size=(4, 150, 170), dtype=np.uint8)

    def classes(device):
        strips = iter_class_strips(model.to(device), lambda r0, r1: raw[:, r0:r1], 150, 170, mean=sample_ds.mean,
                                   std=sample_ds.std, chip_size=64, stride=32, device=device, amp=amp, prefetch=2,
                                   guided_filter=guided)
        return np.concatenate([s.classes for s in strips])

    agreement = (classes("cuda") == classes("cpu")).mean()
    assert agreement > (0.99 if amp else 0.9999)


# --- GeoTIFF output on real georeferenced rasters --------------------------------------------


@pytest.mark.parametrize("path, chip, stride", [(NAIP_260, 64, 32), (NAIP_266x204, 64, 32), (NAIP_175x143, 224, 112)])
def test_map_tile_keeps_georef_and_writes_metadata(tmp_path, model, sample_ds, path, chip, stride):
    out = str(tmp_path / output_name(path))
    assert map_tile(model, path, out, dataset=sample_ds, chip_size=chip, stride=stride, batch_size=4) == out
    with rasterio.open(path) as src, rasterio.open(out) as dst:
        assert (dst.width, dst.height, dst.count, dst.dtypes[0]) == (src.width, src.height, 1, "uint8")
        assert dst.crs == src.crs and dst.crs is not None
        assert dst.transform.almost_equals(src.transform)
        assert dst.nodata == 0
        assert dst.profile["tiled"] and dst.compression is not None
        palette = dst.colormap(1)
        assert {k: palette[k][:3] for k in range(5)} == {k: v[:3] for k, v in sample_ds.colormap().items()}
        assert palette[0][3] == 0 and palette[1][3] == 255  # GDAL makes the nodata entry transparent
        tags = dst.tags()
        assert json.loads(tags["CLASS_NAMES"]) == list(sample_ds.class_names)
        assert load_dataset(json.loads(tags["VCNET_DATASET"])).name == "sample"
        assert dst.tags(1)["CLASS_2"] == "tree canopy"
        classes = dst.read(1)
    expected = whole_tile_oracle(model, read_normalized(path, sample_ds), chip, stride).argmax(0)
    np.testing.assert_array_equal(classes, expected)
    assert not glob.glob(str(tmp_path / ".*.tmp"))


def test_probabilities_output(tmp_path, model, sample_ds):
    out, probs = str(tmp_path / "map.tif"), str(tmp_path / "map_probs.tif")
    map_tile(model, NAIP_266x204, out, dataset=sample_ds, chip_size=64, stride=32, probs_path=probs)
    expected = whole_tile_oracle(model, read_normalized(NAIP_266x204, sample_ds), 64, 32)
    with rasterio.open(probs) as dst:
        assert dst.count == 5 and dst.dtypes[0] == "uint8" and dst.crs is not None
        assert dst.descriptions[2] == "p(tree canopy)" and dst.scales[0] == pytest.approx(1 / 255)
        np.testing.assert_allclose(dst.read().astype(float), expected * 255, atol=0.51)


def test_large_tile_written_in_block_rows(tmp_path, model, sample_ds):
    """Taller than one output block (256 rows), not a multiple of the chip or block."""
    image = np.random.default_rng(3).integers(0, 255, size=(4, 600, 70), dtype=np.uint8)
    path = write_geotiff(str(tmp_path / "tall_naip.tif"), image)
    out = map_tile(model, path, str(tmp_path / output_name(path)), dataset=sample_ds, chip_size=32, stride=16,
                   batch_size=16, num_workers=2)
    with rasterio.open(out) as dst:
        got = dst.read(1)
    expected = whole_tile_oracle(model, normalize(image, sample_ds.mean, sample_ds.std), 32, 16).argmax(0)
    assert (got == expected).mean() > 0.9999  # batch 16 vs 1: float rounding may flip a near-tie
    assert out.endswith("tall_predictions.tif")


# --- resume and bad input ---------------------------------------------------------------------


def test_interrupted_run_leaves_nothing_and_resumes(tmp_path, sample_ds):
    out = str(tmp_path / "map.tif")
    probs = str(tmp_path / "map_probs.tif")
    with pytest.raises(KeyboardInterrupt):
        map_tile(FailAfter(3, KeyboardInterrupt()), NAIP_260, out, dataset=sample_ds, chip_size=32, stride=16,
                 batch_size=4, probs_path=probs)
    assert os.listdir(tmp_path) == []  # no map, no probabilities, no temporary files
    model = TwoConv().eval()
    map_tile(model, NAIP_260, out, dataset=sample_ds, chip_size=32, stride=16, batch_size=64, probs_path=probs)
    assert sorted(os.listdir(tmp_path)) == ["map.tif", "map.tif.aux.xml", "map_probs.tif"]
    mtime = os.path.getmtime(out)
    never = FailAfter(0, AssertionError("an existing output must be skipped"))
    map_tile(never, NAIP_260, out, dataset=sample_ds, chip_size=32, stride=16, probs_path=probs)
    assert os.path.getmtime(out) == mtime
    with pytest.raises(AssertionError):
        map_tile(never, NAIP_260, out, dataset=sample_ds, chip_size=32, stride=16, overwrite=True)
    assert os.path.getmtime(out) == mtime  # the failed overwrite kept the old map


def test_model_mode_is_restored(tmp_path, sample_ds):
    model = TwoConv().train()
    seen = []
    model.register_forward_pre_hook(lambda m, _: seen.append(m.training))
    map_tile(model, NAIP_175x143, str(tmp_path / "m.tif"), dataset=sample_ds, chip_size=224, stride=112)
    assert seen == [False] and model.training


def test_wrong_band_count(tmp_path, model, sample_ds):
    path = write_geotiff(str(tmp_path / "rgb.tif"), np.zeros((3, 40, 40), dtype=np.uint8))
    with pytest.raises(InputError, match=r"rgb\.tif: image has 3 bands, the dataset definition expects 4"):
        map_tile(model, path, str(tmp_path / "out.tif"), dataset=sample_ds, chip_size=32, stride=16)
    assert not os.path.exists(tmp_path / "out.tif")


def test_missing_and_corrupt_tiles(tmp_path, model, sample_ds):
    with pytest.raises(InputError, match="nope.tif: image not found"):
        map_tile(model, str(tmp_path / "nope.tif"), str(tmp_path / "o.tif"), dataset=sample_ds, chip_size=32, stride=16)
    # A real tile cut short: the header opens, the pixel data does not decode.
    truncated = tmp_path / "truncated.tif"
    shutil.copy(NAIP_260, truncated)
    with open(truncated, "r+b") as fh:
        fh.truncate(os.path.getsize(NAIP_260) // 2)
    with pytest.raises(InputError, match="truncated.tif"):
        map_tile(model, str(truncated), str(tmp_path / "o.tif"), dataset=sample_ds, chip_size=32, stride=16)
    assert sorted(os.listdir(tmp_path)) == ["truncated.tif"]


def test_model_with_other_class_count(tmp_path, sample_ds):
    with pytest.raises(InputError, match="outputs 3 classes"):
        map_tile(TwoConv(classes=3).eval(), NAIP_175x143, str(tmp_path / "o.tif"), dataset=sample_ds,
                 chip_size=224, stride=112)
    assert os.listdir(tmp_path) == []


# --- the tiny VCNet ----------------------------------------------------------------------------


def test_tiny_vcnet_strip_wise_equals_one_pass(tiny_checkpoint, tmp_path):
    """A real (tiny) checkpoint: the mapped GeoTIFF equals the whole-tile accumulation."""
    from networks import load_model

    model = load_model(tiny_checkpoint)
    with rasterio.open(NAIP_260) as src:
        raw, profile = src.read(window=((0, 100), (0, 140))), src.profile
    path = write_geotiff(str(tmp_path / "crop_naip.tif"), raw, crs=profile["crs"], transform=profile["transform"])
    image = normalize(raw, model.dataset.mean, model.dataset.std)
    expected = whole_tile_oracle(model, image, 64, 32)
    strips, _ = strips_of(model, image, 64, 32, batch_size=1)
    np.testing.assert_array_equal(np.concatenate([p for _, p in strips], axis=1), expected)
    out = map_tile(model, path, str(tmp_path / "crop_predictions.tif"), dataset=model.dataset, chip_size=64,
                   stride=32, batch_size=1)
    with rasterio.open(out) as dst:
        np.testing.assert_array_equal(dst.read(1), expected.argmax(0))
        assert dst.crs == profile["crs"]
