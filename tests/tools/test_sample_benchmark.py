"""tools/sample_benchmark.py: folds that never score a training pixel, NLCD's own figures, JSON output."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rasterio

from dataset import load_dataset, read_list
from scoring.metrics import confusion_from_arrays
from tests.helpers import SAMPLE_LIST
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
