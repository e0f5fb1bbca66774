"""tools/sample_benchmark.py: folds that never score a training pixel, NLCD's own figures, JSON output."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import rasterio

from dataset import load_dataset, read_list
from dataset.errors import InputError
from scoring.metrics import confusion_from_arrays
from tests.helpers import GEOREF_DIR, SAMPLE_LIST
from tools import sample_benchmark


def test_folds_score_every_patch_once_by_a_model_that_never_saw_it():
    entries = read_list(SAMPLE_LIST)
    splits = sample_benchmark.folds(entries, "heldout", "unused")
    tested = [e.image for _, test in splits for e in test]
    assert sorted(tested) == sorted(e.image for e in entries)
    for train, test in splits:
        assert not {e.image for e in train} & {e.image for e in test}
    assert sample_benchmark.folds(entries, "update", "unused") == [(entries, entries)]


def test_halves_fold_trains_on_one_half_of_every_patch_and_scores_the_other(tmp_path):
    entries = read_list(SAMPLE_LIST)[:2]
    splits = sample_benchmark.folds(entries, "halves", str(tmp_path))
    assert len(splits) == 2 and splits[0] == (splits[1][1], splits[1][0])
    for original, top, bottom in zip(entries, splits[0][0], splits[0][1]):
        for field in ("image", "label", "hr_label"):
            with rasterio.open(getattr(original, field)) as src:
                whole = src.read()
            with rasterio.open(getattr(top, field)) as a, rasterio.open(getattr(bottom, field)) as b:
                # every row once, in order: a fold never scores a pixel it trained on
                assert a.height + b.height == whole.shape[1] and a.height == whole.shape[1] // 2
                np.testing.assert_array_equal(np.concatenate([a.read(), b.read()], axis=1), whole)
                assert b.transform.f == a.transform.f + a.height * a.transform.e  # the bottom half lies below


def test_smoke_run_reports_nlcd_and_each_variant(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = sample_benchmark.main(["--seeds", "3", "--protocols", "update", "halves", "--max_epochs", "1", "--chips_per_tile",
                                  "1", "--batch_size", "4", "--stride", "64", "--variant", "published=--recipe published",
                                  "--work_dir", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    protocols = json.loads(out.read_text())["protocols"]
    result = protocols["update"]
    # NLCD's own agreement, computed here independently from the rasters.
    dataset = load_dataset("sample")
    cm = 0
    for entry in read_list(SAMPLE_LIST):
        with rasterio.open(entry.label) as lr, rasterio.open(entry.hr_label) as hr:
            cm = cm + confusion_from_arrays(dataset.hr_label.map(hr.read(1)), dataset.lr_label.map(lr.read(1)), 4)
    nlcd = result["NLCD (the LR labels as a map)"]
    assert nlcd["pixels"] == 8 * 256 * 256 == cm.sum()
    assert nlcd["overall_accuracy"] == pytest.approx(np.trace(cm[:, 1:]) / cm.sum())
    assert nlcd["mean_iou"] == pytest.approx(0.401, abs=5e-4)  # water is absent from the reference: left out
    recipe = json.loads(out.read_text())["recipe_options"]["published"]
    assert (recipe["label_loss"], recipe["refine_labels"], recipe["refine_features"]) == ("hard", "none", "bands")
    run = result["published"]["runs"][0]
    assert run["seed"] == 3 and run["pixels"] == nlcd["pixels"] and 0 <= run["mean_iou"] <= 1
    # the halves cover the same pixels, each scored once: NLCD's figures are the same
    halves = protocols["halves"]
    assert halves["NLCD (the LR labels as a map)"]["overall_accuracy"] == pytest.approx(nlcd["overall_accuracy"])
    assert halves["NLCD (the LR labels as a map)"]["pixels"] == halves["published"]["runs"][0]["pixels"] == cm.sum()
    assert "published" in capsys.readouterr().out


def test_without_work_dir_the_runs_go_to_a_temporary_folder_removed_at_the_end(monkeypatch):
    seen = []

    def fake_run(args, named, dataset, entries, work):
        open(os.path.join(work, "last.pth"), "wb").close()  # what a run leaves there
        seen.append(work)
        return 0

    monkeypatch.setattr(sample_benchmark, "run_benchmark", fake_run)
    assert sample_benchmark.main(["--seeds", "1"]) == 0
    assert len(seen) == 1 and "vcnet_sample_benchmark_" in seen[0]
    assert not os.path.exists(seen[0])


def test_shifted_folds_train_as_heldout_and_map_images_with_the_other_tiles_radiometry(tmp_path):
    entries = read_list(SAMPLE_LIST)
    dataset = load_dataset("sample")
    heldout = sample_benchmark.folds(entries, "heldout", "unused")
    shifted = sample_benchmark.folds(entries, "shifted", str(tmp_path), dataset)
    moved = []
    for (train, test), (train_shifted, test_shifted) in zip(heldout, shifted):
        assert train_shifted == train  # the same models serve both protocols
        for original, entry in zip(test, test_shifted):
            assert (entry.label, entry.hr_label) == (original.label, original.hr_label)
            assert entry.image != original.image and entry.image.startswith(str(tmp_path))
            with rasterio.open(original.image) as a, rasterio.open(entry.image) as b:
                before, after = a.read().astype(float), b.read()
            assert after.dtype == np.uint8 and after.shape == before.shape
            # band by band a rising linear map: the order of pixels' values is kept
            flat_before, flat_after = before.reshape(4, -1), after.reshape(4, -1).astype(float)
            for band in range(4):
                order = np.argsort(flat_before[band], kind="stable")
                assert np.all(np.diff(flat_after[band][order]) >= 0)
            moved.append(after.reshape(4, -1).astype(float))
    pixels = np.concatenate(moved, axis=1)
    target = np.array([sample_benchmark.OTHER_TILE[band] for band in dataset.bands])
    np.testing.assert_allclose(pixels.mean(axis=1), target[:, 0], atol=0.5)  # rounding and clipping
    np.testing.assert_allclose(pixels.std(axis=1), target[:, 1], atol=0.5)


def test_the_other_tiles_figures_are_those_of_its_copy_in_the_repository():
    with rasterio.open(os.path.join(GEOREF_DIR, "m_3907833_nw_17_1_naip-new.tif")) as src:
        pixels = src.read().reshape(src.count, -1).astype(float)
    figures = np.array([sample_benchmark.OTHER_TILE[band] for band in ("red", "green", "blue", "nir")])
    np.testing.assert_allclose(pixels.mean(axis=1), figures[:, 0], atol=0.01)
    np.testing.assert_allclose(pixels.std(axis=1), figures[:, 1], atol=0.01)


def test_shifted_protocol_reuses_the_heldout_models_and_refuses_other_bands(tmp_path, monkeypatch):
    trained = []
    real_train = sample_benchmark.train
    monkeypatch.setattr(sample_benchmark, "train", lambda *a: trained.append(a[1]) or real_train(*a))
    out = tmp_path / "bench.json"
    assert sample_benchmark.main(["--seeds", "3", "--protocols", "heldout", "shifted", "--max_epochs", "1",
                                  "--chips_per_tile", "1", "--batch_size", "4", "--stride", "64", "--variant",
                                  "published=--recipe published", "--work_dir", str(tmp_path / "work"),
                                  "--json", str(out)]) == 0
    assert len(trained) == 2  # one model per fold, not four
    protocols = json.loads(out.read_text())["protocols"]
    assert protocols["shifted"]["published"]["runs"][0]["pixels"] == 8 * 256 * 256
    assert protocols["shifted"]["NLCD (the LR labels as a map)"] == protocols["heldout"]["NLCD (the LR labels as a map)"]

    three_bands = type("Definition", (), {"bands": ("red", "green", "swir"), "name": "x"})()
    with pytest.raises(InputError, match="swir"):
        sample_benchmark.shifted_images(read_list(SAMPLE_LIST), three_bands, str(tmp_path))


def _bench_file(path, seeds, *, chip_size=64, flags="--recipe robust", nlcd_pixels=10, recipe=None):
    """A --json file as sample_benchmark.py writes it, with made-up figures per seed."""
    def run(seed):
        return {"seed": seed, "mean_iou": 0.4 + seed / 100, "overall_accuracy": 0.8 + seed / 100, "pixels": 10,
                "iou": {"water": None, "tree canopy": 0.8, "low vegetation": 0.3 + seed / 100, "impervious": 0.01 * seed}}
    nlcd = {"mean_iou": 0.425, "overall_accuracy": 0.825, "pixels": nlcd_pixels,
            "iou": {"water": None, "tree canopy": 0.85, "low vegetation": 0.335, "impervious": 0.022}}
    runs = [run(s) for s in seeds]
    table = {sample_benchmark.NLCD_ROW: {**nlcd, "runs": [nlcd]},
             "robust": {**sample_benchmark.summarise(runs), "runs": runs}}
    settings = {"model_config": "tiny", "chip_size": chip_size, "stride": 32, "max_epochs": 30, "chips_per_tile": 16,
                "batch_size": 8, "list_dir": "x.csv", "dataset": "sample", "seeds": seeds}
    results = {"settings": settings, "variants": {"robust": flags}, "protocols": {"heldout": table}}
    if recipe is not None:
        results["recipe_options"] = {"robust": recipe}
    path.write_text(json.dumps(results))
    return str(path)


def test_merge_gives_the_table_over_the_seeds_of_every_file(tmp_path, capsys):
    first, second = _bench_file(tmp_path / "a.json", [1, 2]), _bench_file(tmp_path / "b.json", [4, 3])
    assert sample_benchmark.main(["--merge", first, second, "--json", str(tmp_path / "all.json")]) == 0
    robust = json.loads((tmp_path / "all.json").read_text())["protocols"]["heldout"]["robust"]
    assert [r["seed"] for r in robust["runs"]] == [1, 2, 3, 4]
    assert robust["mean_iou"]["mean"] == pytest.approx(0.425)
    assert robust["mean_iou"]["std"] == pytest.approx(np.std([0.41, 0.42, 0.43, 0.44], ddof=1))
    printed = capsys.readouterr().out
    assert "mean ± std over seeds [1, 2, 3, 4]" in printed
    # seeds 1 and 2 are below NLCD's mIoU and OA, 3 and 4 above; tree canopy never; impervious from seed 3
    assert ("0.410 / 0.420 / 0.430 / 0.440; above NLCD in mIoU 2/4, OA 2/4, tree canopy 0/4, low vegetation 1/4, "
            "impervious 2/4") in printed


@pytest.mark.parametrize("second, message", [
    (dict(seeds=[2]), "seed 2 of 'robust' (heldout) is already in another file"),
    (dict(seeds=[3], chip_size=128), "chip_size 128, but"),
    (dict(seeds=[3], nlcd_pixels=20), "NLCD's heldout figures {'pixels': 20"),
    (dict(seeds=[3], flags="--recipe published"), "variant 'robust' is '--recipe published', in an earlier file"),
    # the same flags after the preset changed
    (dict(seeds=[3], recipe={"refine_jitter": 0.08, "augment": "d4"}),
     "variant 'robust' trained with --refine_jitter 0.08 (earlier 0.0): its preset changed"),
])
def test_merge_refuses_runs_that_are_not_one_table(tmp_path, second, message):
    first = _bench_file(tmp_path / "a.json", [1, 2], recipe={"refine_jitter": 0.0, "augment": "d4"})
    other = _bench_file(tmp_path / "b.json", **second)
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        sample_benchmark.main(["--merge", first, other])
    assert "b.json" in str(caught.value)


def test_merge_names_a_file_that_is_missing_or_not_a_benchmark(tmp_path):
    first = _bench_file(tmp_path / "a.json", [1])
    with pytest.raises(InputError, match="missing.json: cannot read"):
        sample_benchmark.main(["--merge", first, str(tmp_path / "missing.json")])
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(InputError, match="other.json: not a sample_benchmark.py --json file"):
        sample_benchmark.main(["--merge", first, str(tmp_path / "other.json")])
    (tmp_path / "broken.json").write_text('{"a": ')
    with pytest.raises(InputError, match="broken.json: not a JSON file"):
        sample_benchmark.main(["--merge", str(tmp_path / "broken.json")])
    with pytest.raises(SystemExit):
        sample_benchmark.main(["--merge", first, "--variant", "x=--recipe robust"])


def _paired_file(path, protocols):
    """A --json file with variants base and other; ``protocols``: protocol -> (base mIoUs, other mIoUs) of seeds 1..n,
    with impervious IoU above NLCD's 0.022 where the mIoU is above 0.425."""
    def run(seed, miou):
        return {"seed": seed, "mean_iou": miou, "overall_accuracy": 0.9, "pixels": 10,
                "iou": {"water": None, "tree canopy": 0.9, "low vegetation": 0.4, "impervious": 0.1 if miou > 0.425 else 0}}
    nlcd = {"mean_iou": 0.4, "overall_accuracy": 0.85, "pixels": 10,
            "iou": {"water": None, "tree canopy": 0.85, "low vegetation": 0.335, "impervious": 0.022}}
    tables = {}
    for protocol, (base, other) in protocols.items():
        tables[protocol] = {sample_benchmark.NLCD_ROW: {**nlcd, "runs": [nlcd]}}
        for name, values in (("base", base), ("other", other)):
            runs = [run(seed, value) for seed, value in enumerate(values, 1)]
            tables[protocol][name] = {**sample_benchmark.summarise(runs), "runs": runs}
    settings = {"model_config": "tiny", "chip_size": 64, "stride": 32, "max_epochs": 30, "chips_per_tile": 16,
                "batch_size": 8, "list_dir": "x.csv", "dataset": "sample", "seeds": None}
    path.write_text(json.dumps({"settings": settings, "variants": {"base": "--recipe robust", "other": "--seed_x"},
                                "protocols": tables}))
    return str(path)


def test_compare_pairs_the_runs_of_each_seed_and_protocol(tmp_path, capsys):
    given = _paired_file(tmp_path / "runs.json", {
        # other - base: -0.01, +0.02, +0.03, +0.04, +0.05 (ranks 1-5, positive sum 14: p = 2 / 32)
        "heldout": ([0.40, 0.40, 0.40, 0.40, 0.40], [0.39, 0.42, 0.43, 0.44, 0.45]),
        # +0.06, +0.07, +0.08: with heldout, eight pairs whose one loss has the smallest rank: p = 2 / 256
        "update": ([0.40, 0.40, 0.40], [0.46, 0.47, 0.48]),
    })
    out = tmp_path / "merged.json"
    assert sample_benchmark.main(["--merge", given, "--compare", "base", "--json", str(out)]) == 0
    other = json.loads(out.read_text())["comparisons"]["other"]
    assert other["base"] == "base"
    assert other["protocols"]["heldout"]["higher"] == 4 and other["protocols"]["heldout"]["seeds"] == [1, 2, 3, 4, 5]
    assert other["protocols"]["heldout"]["p_greater"] == pytest.approx(2 / 32)
    assert other["protocols"]["update"]["p_greater"] == pytest.approx(1 / 8)
    assert other["pooled"]["pairs"] == 8 and other["pooled"]["mean_difference"] == pytest.approx(0.34 / 8)
    assert other["pooled"]["p_greater"] == pytest.approx(2 / 256)
    # impervious above NLCD's in 3 + 3 of 8 runs of other (mIoU above 0.425), in none of base's: of the tables
    # with 6 hits in 16 runs, only 6-0 and its mirror 0-6 are as unlikely, each C(8, 6) / C(16, 6) = 28 / 8008
    assert other["above_nlcd"]["impervious"] == {"variant": 6, "base": 0, "runs": 8,
                                                 "fisher_p": pytest.approx(56 / 8008, rel=1e-9)}
    printed = capsys.readouterr().out
    assert "other against base, runs paired by protocol and seed" in printed
    assert "pooled     8 pairs: mIoU +0.0425, higher in 7, p = 0.008" in printed


def test_compare_names_a_variant_that_is_not_in_the_runs(tmp_path, monkeypatch):
    given = _paired_file(tmp_path / "runs.json", {"heldout": ([0.4], [0.41])})
    with pytest.raises(InputError, match="--compare 'robust': no such variant \\(the runs have base, other\\)"):
        sample_benchmark.main(["--merge", given, "--compare", "robust"])
    monkeypatch.setattr(sample_benchmark, "run_benchmark", lambda *args: pytest.fail("trained before the check"))
    with pytest.raises(InputError, match="--compare 'base': no such variant \\(the runs have robust\\)"):
        sample_benchmark.main(["--variant", "robust=--recipe robust", "--compare", "base"])  # before any training
