"""test.py, mIoU.py and auto_test.sh end to end with a tiny checkpoint, and their bad-input errors."""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import torch

from dataset import read_list
from dataset.errors import run_cli
from mapping.writer import output_name
from tests.helpers import REPO_ROOT, SAMPLE_LIST, gdalinfo, run_main, write_geotiff, write_list

FAST = ["--device", "cpu", "--chip_size", "64", "--stride", "32", "--batch_size", "4", "--num_workers", "1"]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"vcnet_script_{name}", os.path.join(REPO_ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TEST_PY = _script("test")
MIOU_PY = _script("mIoU")


def run(script, argv, capsys):
    """Run a script's main through run_cli; return (exit status, stdout, last line of stderr)."""
    return run_main(script.main, argv, capsys)


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Three 80 x 64 georeferenced crops of the real sample tiles (image, NLCD, CCLC) and their list.

    With 64-pixel chips at stride 32 that is two overlapping chips per tile: small, still stitched.
    """
    root = tmp_path_factory.mktemp("crops")
    rows = []
    for entry in read_list(SAMPLE_LIST, required=("image_fn", "label_fn", "hr_label_fn"))[:3]:
        row = []
        for path in (entry.image, entry.label, entry.hr_label):
            with rasterio.open(path) as src:
                data = src.read(window=((0, 80), (0, 64)))
            row.append(write_geotiff(str(root / os.path.basename(path)), data))
        rows.append(row)
    return write_list(root / "list.csv", rows)


@pytest.fixture(scope="module")
def mapped(crops, tiny_checkpoint, tmp_path_factory):
    """The crops mapped once by test.py (with probabilities and previews)."""
    save = tmp_path_factory.mktemp("pred")
    code = run_cli(TEST_PY.main, ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir", str(save),
                                  "--save_probs", "--preview", *FAST])
    assert code == 0
    return str(save)


def test_test_py_writes_maps_probabilities_previews(crops, mapped):
    images = [e.image for e in read_list(crops, required=("image_fn",))]
    for image in images:
        out = os.path.join(mapped, output_name(image))
        assert out.endswith("_predictions.tif")
        with rasterio.open(image) as src, rasterio.open(out) as dst:
            assert dst.crs == src.crs and dst.transform == src.transform and dst.nodata == 0
            assert dst.read(1).max() < 5
        assert os.path.isfile(out[:-4] + "_probs.tif") and os.path.isfile(out[:-4] + "_preview.png")
        assert gdalinfo(out)["bands"][0]["categories"] == ["no data", "water", "tree canopy", "low vegetation",
                                                           "impervious"]
    assert not glob.glob(os.path.join(mapped, ".*"))


def test_rerun_skips_and_overwrite_remaps(crops, tiny_checkpoint, mapped, capsys):
    argv = ["--model_path", tiny_checkpoint, "--list_dir", crops, "--save_path", mapped, "--save_probs", *FAST]
    code, out, _ = run(TEST_PY, argv, capsys)
    assert code == 0 and "0 tiles mapped, 3 already done" in out
    code, out, _ = run(TEST_PY, argv + ["--overwrite"], capsys)
    assert code == 0 and "3 tiles mapped, 0 already done" in out


def test_miou_py_json_png_summary(crops, mapped, tmp_path, capsys):
    report = tmp_path / "metrics.json"
    argv = ["--pred_dir", mapped, "--list_dir", crops, "--json", report, "--confusion_png", tmp_path / "cm.png",
            "--summary_csv", tmp_path / "summary.csv", "--label", "tiny"]
    code, out, _ = run(MIOU_PY, argv, capsys)  # dataset read from the maps' tags
    assert code == 0 and "mIoU" in out and "legacy" in out
    data = json.loads(report.read_text())
    for key in ("overall_accuracy", "mean_iou", "fw_iou", "kappa"):
        assert isinstance(data[key], float)
    assert set(data["per_class"]) == {"water", "tree canopy", "low vegetation", "impervious"}
    assert len(data["confusion_matrix"]["counts"]) == 4 and len(data["tiles"]) == 3
    assert data["legacy"]["oa_mean_recall"] is not None and data["dataset"] == "sample"
    assert data["valid_pixels"] == 3 * 80 * 64
    assert (tmp_path / "cm.png").stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert rows[0]["checkpoint"] == "tiny" and float(rows[0]["mean_iou"]) == pytest.approx(data["mean_iou"], abs=1e-6)


def test_interrupted_run_resumes(crops, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import mapping.run

    real = mapping.run.map_tile
    calls = []

    def interrupt_second_tile(model, image, out, **kw):
        calls.append(image)
        if len(calls) == 2:
            def stop(x):
                raise KeyboardInterrupt
            model = stop
        return real(model, image, out, **kw)

    monkeypatch.setattr(mapping.run, "map_tile", interrupt_second_tile)
    argv = ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir", tmp_path, *FAST]
    code, _, err = run(TEST_PY, argv, capsys)
    assert code == 130 and "interrupted" in err
    first = output_name(read_list(crops)[0].image)
    # The first map and its class names; nothing of the second, no temporary file.
    assert sorted(os.listdir(tmp_path)) == [first, first + ".aux.xml"]
    monkeypatch.setattr(mapping.run, "map_tile", real)
    code, out, _ = run(TEST_PY, argv, capsys)
    assert code == 0 and "2 tiles mapped, 1 already done" in out


def test_torchrun_ranks_split_the_list(crops, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, _ = run(TEST_PY, ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir", tmp_path,
                                 *FAST], capsys)
    assert code == 0 and "(rank 1 of 2)" in out
    second = read_list(crops, required=("image_fn",))[1].image
    assert sorted(os.listdir(tmp_path)) == [output_name(second), output_name(second) + ".aux.xml"]


def test_shards_and_ranks_cover_every_tile_once():
    from mapping.run import tile_share

    tiles = list(range(23))
    for count in (1, 2, 5, 30):
        for world in (1, 3):
            shares = [tile_share(tiles, (index, count), rank, world) for index in range(count) for rank in range(world)]
            assert sorted(t for share in shares for t in share) == tiles
    assert tile_share(tiles, (0, 1), 1, 3) == tiles[1::3]  # without --shard: the torchrun split as before


def test_shard_option_composes_with_torchrun(crops, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    tiles = [e.image for e in read_list(crops, required=("image_fn",))]
    argv = ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir", tmp_path, *FAST]
    code, out, _ = run(TEST_PY, argv + ["--shard", "1/3"], capsys)
    assert code == 0 and "1 tiles mapped, 0 already done (shard 1/3)" in out
    assert glob.glob(str(tmp_path / "*.tif")) == [str(tmp_path / output_name(tiles[1]))]
    # Shard 0 of 2 holds tiles 0 and 2; rank 1 of 2 takes the second of them.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, _ = run(TEST_PY, argv + ["--shard", "0/2"], capsys)
    assert code == 0 and "1 tiles mapped, 0 already done (shard 0/2, rank 1 of 2)" in out
    assert set(glob.glob(str(tmp_path / "*.tif"))) == {str(tmp_path / output_name(tiles[i])) for i in (1, 2)}


def test_mapping_makes_the_rank_gpu_current_with_cudnn_benchmark(crops, tiny_checkpoint, tmp_path, capsys,
                                                                 monkeypatch):
    import mapping.run
    import runtime.device

    prepared = []
    monkeypatch.setattr(mapping.run, "prepare_device", prepared.append)
    run(TEST_PY, ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir", tmp_path, *FAST], capsys)
    assert prepared == [torch.device("cpu")]
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    runtime.device.prepare_device(torch.device("cuda", 1))
    assert current == [torch.device("cuda", 1)] and torch.backends.cudnn.benchmark


# --- bad input: one line naming the file, exit 2, nothing partial left ---------------------------


def _bad_checkpoint(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "published":
        torch.save({"cnn_encoder.startconv.weight": torch.zeros(1)}, path)
    elif kind == "corrupt":
        path.write_bytes(b"not a checkpoint")
    return str(path)


@pytest.mark.parametrize("kind, message", [
    ("missing", "missing.pth: checkpoint not found"),
    ("published", "networks.convert_published"),
    ("corrupt", "corrupt.pth: cannot read checkpoint"),
])
def test_bad_checkpoints(crops, tmp_path, capsys, kind, message):
    save = tmp_path / "out"
    code, _, err = run(TEST_PY, ["--checkpoint", _bad_checkpoint(tmp_path, kind), "--list_dir", crops,
                                 "--out_dir", save, *FAST], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not save.exists()


def _bad_list(tmp_path, crops, kind):
    rows = [[e.image, e.label, e.hr_label] for e in read_list(crops)]
    if kind == "missing tile":
        rows[1][0] = str(tmp_path / "gone_naip.tif")
    elif kind == "three bands":
        rows[2][0] = write_geotiff(str(tmp_path / "rgb_naip.tif"), np.zeros((3, 40, 40), dtype=np.uint8))
    elif kind == "truncated tile":
        bad = str(tmp_path / "cut_naip.tif")
        write_geotiff(bad, np.random.default_rng(0).integers(0, 255, (4, 96, 96), dtype=np.uint8))
        with open(bad, "r+b") as fh:
            fh.truncate(os.path.getsize(bad) // 4)  # the first band of chip rows is already cut
        rows[1][0] = bad
    return write_list(tmp_path / "bad.csv", rows)


@pytest.mark.parametrize("kind, message", [
    ("missing tile", "gone_naip.tif"),
    ("three bands", "rgb_naip.tif: image has 3 bands, the dataset definition expects 4"),
    ("truncated tile", "cut_naip.tif: cannot read pixels"),
])
def test_bad_tiles(crops, tiny_checkpoint, tmp_path, capsys, kind, message):
    save = tmp_path / "out"
    code, _, err = run(TEST_PY, ["--checkpoint", tiny_checkpoint, "--list_dir", _bad_list(tmp_path, crops, kind),
                                 "--out_dir", save, *FAST], capsys)
    assert code == 2 and err.startswith("error: ") and message in err
    # Every one is found before mapping starts (a truncated tile when its pixels are first sampled).
    assert not save.exists() or not os.listdir(save)


def test_dataset_with_other_band_count(crops, tiny_checkpoint, tmp_path, capsys):
    with open(os.path.join(REPO_ROOT, "dataset", "definitions", "sample.json")) as fh:
        definition = json.load(fh)
    definition.update(name="rgb", bands=["r", "g", "b"], mean=[1, 2, 3], std=[1, 1, 1])
    path = tmp_path / "rgb.json"
    path.write_text(json.dumps(definition))
    code, _, err = run(TEST_PY, ["--checkpoint", tiny_checkpoint, "--dataset", path, "--list_dir", crops,
                                 "--out_dir", tmp_path / "out", *FAST], capsys)
    assert code == 2 and "'rgb' has 3 bands, the checkpoint's model ('sample') expects 4" in err


def test_miou_bad_inputs(crops, mapped, tmp_path, capsys):
    entries = read_list(crops)
    # A reference that does not exist.
    rows = [[e.image, e.label, e.hr_label] for e in entries]
    rows[0][2] = str(tmp_path / "gone_lc.tif")
    code, _, err = run(MIOU_PY, ["--pred_dir", mapped, "--list_dir", write_list(tmp_path / "a.csv", rows)], capsys)
    assert code == 2 and "gone_lc.tif" in err
    # A list row without a reference.
    rows[0][2] = ""
    code, _, err = run(MIOU_PY, ["--pred_dir", mapped, "--list_dir", write_list(tmp_path / "b.csv", rows)], capsys)
    assert code == 2 and "hr_label_fn" in err
    # A prediction missing from the folder.
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(os.path.join(mapped, output_name(entries[0].image)), partial)
    code, _, err = run(MIOU_PY, ["--pred_dir", partial, "--list_dir", crops, "--json", tmp_path / "m.json"], capsys)
    assert code == 2 and output_name(entries[1].image) in err and "prediction not found" in err
    assert not (tmp_path / "m.json").exists()
    # A prediction on another grid.
    shutil.copy(os.path.join(mapped, output_name(entries[1].image)), partial)
    other = os.path.join(partial, output_name(entries[2].image))
    write_geotiff(other, np.ones((1, 80, 64), dtype=np.uint8), crs="EPSG:26918")
    code, _, err = run(MIOU_PY, ["--pred_dir", partial, "--list_dir", crops, "--dataset", "sample"], capsys)
    assert code == 2 and f"{other}: CRS" in err
    # Maps without the dataset tag need --dataset.
    bare = tmp_path / "bare"
    bare.mkdir()
    write_geotiff(str(bare / "x.tif"), np.ones((1, 4, 4), dtype=np.uint8))
    code, _, err = run(MIOU_PY, ["--pred_dir", bare, "--list_dir", crops], capsys)
    assert code == 2 and "give --dataset" in err


def _auto_test(args, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", os.path.join(REPO_ROOT, "auto_test.sh"), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_auto_test_folder_order_summary_and_first_failure(crops, tiny_checkpoint, tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name in ("epoch_2.pth", "epoch_10.pth"):
        shutil.copy(tiny_checkpoint, folder / name)
    (folder / "epoch_5.pth").write_bytes(b"broken")
    out = tmp_path / "res"
    done = _auto_test(["--list_dir", crops, "--device", "cpu", "--chip_size", "64", "--stride", "32", "--out_dir", out,
                       folder], tmp_path)
    # Version order: epoch_2, then epoch_5, which fails; epoch_10 is never started.
    assert done.returncode != 0
    assert "epoch_5.pth: cannot read checkpoint" in done.stderr and "mapping with" in done.stderr
    assert not (out / "epoch_10").exists()
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["checkpoint"] for r in rows] == ["epoch_2"]
    assert float(rows[0]["overall_accuracy"]) >= 0 and rows[0]["iou_tree_canopy"] != ""
    assert json.loads((out / "epoch_2" / "metrics.json").read_text())["tiles"]


def _checkpoint_with(tiny_checkpoint, path, train_args, **extra):
    """The tiny checkpoint's weights saved under ``path`` with these ``train_args`` (and ``extra`` entries)."""
    from networks.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint

    payload = read_checkpoint(tiny_checkpoint)
    save_checkpoint(str(path), model=model_from_checkpoint(payload), model_config=payload["model_config"],
                    dataset=payload["dataset"], train_args=train_args, **extra)
    return str(path)


def _map_crops(capsys, checkpoint, crops, out_dir, *flags):
    """test.py on the crops: ``(exit code, stdout, stderr, the first map's classes, its VCNET_WINDOW tag)``
    (the last two None when there is no map)."""
    code, out, err = run(TEST_PY, ["--checkpoint", checkpoint, "--list_dir", crops, "--out_dir", str(out_dir),
                                   *flags, *FAST], capsys)
    return (code, out, err) + _first_map(crops, out_dir)


def _first_map(crops, folder):
    """The classes and the VCNET_WINDOW tag of the first crop's map in ``folder`` (None, None if absent)."""
    path = os.path.join(folder, output_name(read_list(crops, required=("image_fn",))[0].image))
    if not os.path.exists(path):
        return None, None
    with rasterio.open(path) as src:
        return src.read(1), src.tags()["VCNET_WINDOW"]


def test_the_checkpoint_s_guided_filter_is_applied_and_recorded(crops, tiny_checkpoint, mapped, tmp_path, capsys):
    """A checkpoint trained with --guided_filter R maps with it, without a flag; --guided_filter overrides it;
    maps made with another filter are not taken for this run's."""
    from networks.checkpoint import load_model

    robust = _checkpoint_with(tiny_checkpoint, tmp_path / "robust.pth", {"recipe": "robust", "guided_filter": 2})
    assert load_model(robust).guided_filter == 2 and load_model(tiny_checkpoint).guided_filter == 0
    plain = _first_map(crops, mapped)[0]

    code, out, _, filtered, window = _map_crops(capsys, robust, crops, tmp_path / "a")
    assert code == 0 and "guided filter of radius 2 on each chip's probabilities (the checkpoint's recipe)" in out
    assert window == "chip=64 stride=32 guided_filter=2" and not np.array_equal(plain, filtered)
    assert np.array_equal(_map_crops(capsys, tiny_checkpoint, crops, tmp_path / "b", "--guided_filter", "2")[3],
                          filtered)
    assert np.array_equal(_map_crops(capsys, robust, crops, tmp_path / "c", "--guided_filter", "0")[3], plain)
    code, _, err, _, _ = _map_crops(capsys, robust, crops, tmp_path / "a", "--guided_filter", "0")
    assert code == 2 and "made with checkpoint sha256" in err and "guided filter 2" in err


def test_the_checkpoint_s_label_model_votes_and_is_recorded(crops, tiny_checkpoint, mapped, tmp_path, capsys):
    """A checkpoint trained with --label_model_weight W maps with its label model's vote, without a flag;
    --label_model_weight 0 maps with the network alone; maps made with another weight are not taken for this
    run's; a checkpoint without a label model cannot vote."""
    from networks.label_model import BaggedLabelModel

    torch.manual_seed(3)
    voting = _checkpoint_with(tiny_checkpoint, tmp_path / "voting.pth",
                              {"recipe": "robust", "label_model_weight": 1.0, "refine_features": "bands"},
                              label_model=BaggedLabelModel.empty(4, 5, 2).state_dict())
    plain = _first_map(crops, mapped)[0]

    code, out, _, voted, window = _map_crops(capsys, voting, crops, tmp_path / "a", "--guided_filter", "0")
    assert code == 0 and "the run's label model votes with weight 1 (the checkpoint's recipe)" in out
    assert window == "chip=64 stride=32 label_model_weight=1" and not np.array_equal(plain, voted)
    assert np.array_equal(_map_crops(capsys, voting, crops, tmp_path / "b", "--label_model_weight", "0")[3], plain)
    code, _, err, _, _ = _map_crops(capsys, voting, crops, tmp_path / "a", "--label_model_weight", "0.5")
    assert code == 2 and "made with checkpoint sha256" in err and "label model weight 1" in err
    code, _, err, _, _ = _map_crops(capsys, tiny_checkpoint, crops, tmp_path / "c", "--label_model_weight", "1")
    assert code != 0 and "--label_model_weight 1 needs the run's label model" in err


def test_image_nodata_reaches_the_maps_and_their_provenance(crops, tiny_checkpoint, tmp_path, capsys):
    """Pixels at the tile's declared nodata in every band are written 0 through test.py; --image_nodata none
    maps them; maps made with another setting are not taken for this run's; a bad value is refused."""
    entry = read_list(crops, required=("image_fn", "label_fn", "hr_label_fn"))[0]
    with rasterio.open(entry.image) as src:
        image = src.read()
    image[:, 10:30, 5:25] = 0
    holed = write_geotiff(str(tmp_path / "holed_naip.tif"), image, nodata=0)
    listed = write_list(tmp_path / "holed.csv", [[holed, entry.label, entry.hr_label]])
    code, _, _, classes, _ = _map_crops(capsys, tiny_checkpoint, listed, tmp_path / "auto")
    assert code == 0 and (classes[10:30, 5:25] == 0).all() and (classes[30:] > 0).all()
    code, _, _, classes, _ = _map_crops(capsys, tiny_checkpoint, listed, tmp_path / "none", "--image_nodata", "none")
    assert code == 0 and (classes > 0).all()
    code, _, err, _, _ = _map_crops(capsys, tiny_checkpoint, listed, tmp_path / "none")
    assert code == 2 and "made with checkpoint sha256" in err and "image nodata none" in err
    code, _, err, _, _ = _map_crops(capsys, tiny_checkpoint, listed, tmp_path / "bad", "--image_nodata", "zero")
    assert code == 2 and err == "error: --image_nodata zero: give auto, none or a number (e.g. 0)\n"
