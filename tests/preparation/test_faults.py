"""Faults of ``tools/prepare_data.py`` (docs/reliability.md): full disks while aligning, labels left
short by an older run, unwritable outputs, and lists that must not be half written."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import rasterio

import preparation.align
from dataset.raster_io import raster_problem
from tests.helpers import GEOREF_DIR, SAMPLE_DIR, mounted_tmpfs, run_main, start_lock_holder, write_geotiff
from tools.prepare_data import main

NAIP = os.path.join(GEOREF_DIR, "m_3907833_nw_17_1_naip-new.tif")
NLCD = os.path.join(GEOREF_DIR, "m_3907833_nw_17_1_nlcd.tif")
LABEL = "m_3907833_nw_17_1_naip-new_lr.tif"


def align(capsys, out_dir, *extra):
    return run_main(main, ["align", "--lr", NLCD, "--images", NAIP, "--out_dir", out_dir, *extra], capsys)


class ShortWrites:
    """rasterio as the aligner sees it, except that every written file ends up cut after a close that
    reported success: what GDAL does when the disk fills while it flushes its cache."""

    def __getattr__(self, name):
        return getattr(rasterio, name)

    @contextlib.contextmanager
    def open(self, path, mode="r", **kwargs):
        with rasterio.open(path, mode, **kwargs) as dataset:
            yield dataset
        if mode == "w":
            os.truncate(path, 1024)


def test_silent_write_failure_while_aligning_leaves_no_label(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preparation.align, "rasterio", ShortWrites())
    code, out, err = align(capsys, tmp_path)
    assert code == 2 and err.startswith(f"error: {tmp_path / LABEL}: the label could not be completely written")
    assert "covered" not in out and os.listdir(tmp_path) == []


def test_disk_full_while_aligning(tmp_path, capsys):
    with mounted_tmpfs(tmp_path / "small", "4k") as small:
        code, out, err = align(capsys, small)
        assert code == 2 and "no space left on the device" in err and "covered" not in out
        assert os.listdir(small) == []


def test_skip_existing_aligns_an_incomplete_label_again(tmp_path, capsys):
    assert align(capsys, tmp_path)[0] == 0
    os.truncate(tmp_path / LABEL, 0)
    code, out, _ = align(capsys, tmp_path, "--skip_existing")
    assert code == 0 and f"aligning {tmp_path / LABEL} again: the existing label is incomplete" in out
    assert raster_problem(str(tmp_path / LABEL)) is None
    code, out, _ = align(capsys, tmp_path, "--skip_existing")  # a complete one is kept
    assert code == 0 and "aligned 0 tiles" in out


def test_unwritable_align_and_stats_outputs(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = align(capsys, a_file)
    assert code == 2 and err == f"error: --out_dir {a_file}: is a file, not a folder\n"
    code, _, err = run_main(main, ["stats", "--images", os.path.join(SAMPLE_DIR, "naip", "*.tif"), "--base", "sample",
                                   "--out", tmp_path], capsys)
    assert code == 2 and err == f"error: --out {tmp_path}: is a folder; give a file name\n"
    with mounted_tmpfs(tmp_path / "ro", read_only=True) as ro:
        code, _, err = align(capsys, os.path.join(ro, "labels"))
        assert code == 2 and err.startswith(f"error: --out_dir {ro}/labels: cannot write in this folder (Read-only")


def test_list_writes_nothing_when_the_split_fails(tmp_path, capsys):
    """A spatial split of tiles without a CRS fails after the rows are built: no list is written."""
    for i in range(3):
        write_geotiff(str(tmp_path / f"t{i}.tif"), np.ones((1, 8, 8), dtype=np.uint8), crs=None)
        write_geotiff(str(tmp_path / f"t{i}_lr.tif"), np.ones((1, 8, 8), dtype=np.uint8), crs=None)
    out = tmp_path / "lists" / "area.csv"
    code, _, err = run_main(main, ["list", "--images", str(tmp_path / "t?.tif"), "--labels", "{dir}/{stem}_lr.tif",
                                   "--out", out, "--split", "spatial"], capsys)
    assert code == 2 and "has no CRS; a spatial split needs georeferenced tiles" in err
    assert not out.parent.exists()
    code, _, err = run_main(main, ["list", "--images", str(tmp_path / "t?.tif"), "--labels", "{dir}/{stem}_lr.tif",
                                   "--out", out, "--split", "random", "--val_fraction", "1"], capsys)
    assert code == 2 and "--val_fraction 1.0" in err and not out.parent.exists()


def test_a_second_align_leaves_a_label_in_progress_alone(tmp_path):
    import threading
    import time

    out, go = tmp_path / "labels" / LABEL, tmp_path / "go"
    holder = start_lock_holder(out, [go])  # holds the label's lock, a write in progress, until go exists
    logs, failures = [], []

    def second_run():
        try:
            preparation.align.align_tiles([NAIP], [NLCD], str(tmp_path / "labels"), log=logs.append)
        except Exception as exc:  # reported below
            failures.append(exc)

    try:
        assert holder.stdout.readline().strip() == "locked"
        second = threading.Thread(target=second_run)
        second.start()
        deadline = time.time() + 60
        while not logs and time.time() < deadline:
            time.sleep(0.05)
        assert logs == [f"waiting for {out}: another process is aligning it"]
        go.touch()
        assert holder.stdout.readline().strip() == "intact"  # not removed as a stale temporary
        second.join(timeout=60)
    finally:
        go.touch()
        holder.wait(timeout=60)
    assert not failures and raster_problem(str(out)) is None  # aligned once the other run let go
    assert os.listdir(tmp_path / "labels") == [LABEL]  # nor a temporary, nor the lock file
