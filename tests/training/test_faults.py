"""Faults of a training run (docs/reliability.md): clobbered runs, two runs in one folder, full disks,
diverged losses, unusable devices and checkpoints, and errors that reach train.log."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import networks.checkpoint
import train
from dataset.errors import InputError, run_cli
from dataset.files import FolderLock
from networks import load_model, read_checkpoint
from runtime.device import resolve_device
from tests.helpers import REPO_ROOT, mounted_tmpfs
from tests.training.test_trainer import four_tiles, one_torch_thread, options  # noqa: F401 (fixtures)
from training.run_folder import LOCK_NAME
from training.trainer import Trainer


def _argv(list_dir, out_dir, *extra):
    return ["--dataset", "sample", "--list_dir", list_dir, "--model_config", "tiny", "--chip_size", "32",
            "--chips_per_tile", "2", "--num_workers", "0", "--device", "cpu", "--out_dir", str(out_dir), *extra]


def _last_error(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_overwrite_moves_the_previous_run_aside(tmp_path, four_tiles, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert run_cli(train.main, _argv(four_tiles, run, "--max_epochs", "3", "--save_interval", "1")) == 0
    old_last = read_checkpoint(str(run / "last.pth"))
    assert run_cli(train.main, _argv(four_tiles, run, "--max_epochs", "1", "--overwrite", "--seed", "7")) == 0
    capsys.readouterr()
    aside = glob.glob(str(run / "previous_run_*"))
    assert len(aside) == 1
    aside = aside[0]
    assert sorted(glob.glob("*", root_dir=run)) == sorted(["epoch_0.pth", "last.pth", os.path.basename(aside),
                                                           "run_config.json", "tensorboard", "train.log"])
    assert sorted(os.listdir(aside)) == ["epoch_0.pth", "epoch_1.pth", "epoch_2.pth", "last.pth", "run_config.json",
                                         "tensorboard", "train.log"]
    assert read_checkpoint(os.path.join(aside, "last.pth"))["step"] == old_last["step"]
    log = (run / "train.log").read_text()
    assert f"--overwrite: moved the previous run (epoch_0.pth, epoch_1.pth, epoch_2.pth, last.pth, run_config.json, " \
           f"tensorboard, train.log) to {aside}" in log
    assert "epoch 3/3" not in log and read_checkpoint(str(run / "last.pth"))["train_args"]["seed"] == 7
    assert len(os.listdir(run / "tensorboard")) == 1


def test_temporaries_of_a_killed_run_are_removed_at_the_next_start(tmp_path, four_tiles):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".last.pth.x1.tmp", run / ".epoch_1.pth.x2.tmp", run / ".run_config.json.x3.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    Trainer(options(tmp_path, four_tiles, max_epochs=2)).close()
    assert not [p for p in stale if p.exists()]


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, four_tiles, capsys):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    lock = FolderLock(str(run), LOCK_NAME, "another training run")  # what a running train.py holds
    try:
        assert run_cli(train.main, _argv(four_tiles, run, "--max_epochs", "1")) == 2
        assert _last_error(capsys).startswith(f"error: {run}: another training run is already writing here (pid "
                                              f"{os.getpid()} since ")
        assert not os.path.exists(run / "last.pth") and not os.path.exists(run / "train.log")
    finally:
        lock.release()


def test_a_killed_run_does_not_leave_its_folder_locked(tmp_path, four_tiles, capsys):  # noqa: F811
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO_ROOT!r})
        from dataset.files import FolderLock
        FolderLock({str(tmp_path)!r}, {LOCK_NAME!r})
        print("locked", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match="already writing here"):
            FolderLock(str(tmp_path), LOCK_NAME)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    FolderLock(str(tmp_path), LOCK_NAME).release()  # kill -9 released it


def test_disk_full_while_saving_a_checkpoint(tmp_path, four_tiles, capsys):  # noqa: F811
    with mounted_tmpfs(tmp_path / "small", "600k") as run:
        assert run_cli(train.main, _argv(four_tiles, run, "--max_epochs", "1")) == 2
        message = _last_error(capsys)
        assert message.startswith(f"error: {run}/last.pth: cannot write the checkpoint (no space left on the device")
        assert "nothing was saved under this name" in message
        assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
        assert f"ERROR error: {run}/last.pth: cannot write" in open(os.path.join(run, "train.log")).read()


def test_checkpoint_write_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    """torch reports a full disk as an "enforce fail"; simulated so it runs without root."""
    from networks import build_model
    from networks.config import get_tiny_config

    model, config = build_model(get_tiny_config()), get_tiny_config()
    path = str(tmp_path / "last.pth")
    networks.checkpoint.save_checkpoint(path, model=model, model_config=config, dataset=_sample())
    before = open(path, "rb").read()

    def full_disk(payload, target):
        open(target, "wb").write(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(networks.checkpoint.torch, "save", full_disk)
    with pytest.raises(InputError, match=r"last\.pth: cannot write the checkpoint \(.*\); the previous file under "
                                         "this name is unchanged"):
        networks.checkpoint.save_checkpoint(path, model=model, model_config=config, dataset=_sample())
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["last.pth"]


def _sample():
    from dataset import load_dataset

    return load_dataset("sample")


def test_unwritable_run_folders(tmp_path, four_tiles, capsys):  # noqa: F811
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert run_cli(train.main, _argv(four_tiles, a_file, "--max_epochs", "1")) == 2
    assert _last_error(capsys) == f"error: --out_dir {a_file}: is a file, not a folder"
    with mounted_tmpfs(tmp_path / "ro", read_only=True) as ro:
        assert run_cli(train.main, _argv(four_tiles, os.path.join(ro, "run"), "--max_epochs", "1")) == 2
        assert _last_error(capsys).startswith(f"error: --out_dir {ro}/run: cannot write in this folder (Read-only")


def _diverging_at(step):
    """A Trainer whose loss becomes NaN at ``step``."""
    class Diverging(Trainer):
        def train_step(self, batch):
            terms, lr = super().train_step(batch)
            if self.step == step:
                terms.total.data.fill_(float("nan"))
            return terms, lr
    return Diverging


def test_non_finite_loss_is_one_line_and_keeps_the_last_checkpoint(tmp_path, four_tiles):  # noqa: F811
    trainer = _diverging_at(3)(options(tmp_path, four_tiles, max_epochs=2, log_interval=1))  # 4 steps per epoch
    with pytest.raises(InputError) as caught:
        trainer.fit()
    last = tmp_path / "run" / "last.pth"
    message = str(caught.value)
    assert message.startswith("the loss is not finite at step 3 (nan) at lr ") and "lower --base_lr" in message
    assert "no checkpoint was written" in message and not last.exists()
    # In the second epoch, between logging windows: the epoch's total catches it before the save.
    trainer = _diverging_at(6)(options(tmp_path, four_tiles, max_epochs=2, log_interval=100, overwrite=True))
    with pytest.raises(InputError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert message.startswith("the loss is not finite in epoch 2")
    assert f"{last} (written before the divergence) is intact" in message
    assert read_checkpoint(str(last))["epoch"] == 0
    assert "ERROR error: the loss is not finite in epoch 2" in (tmp_path / "run" / "train.log").read_text()


def test_device_names_are_checked(monkeypatch):
    for device in ("meta", "mps", "cuda:x"):
        with pytest.raises(InputError, match=f"--device {device}: not a"):
            resolve_device(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(InputError, match=f"--device {device}: CUDA is not available"):
            resolve_device(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match="--device cuda:1: this machine has 1 CUDA device"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_checkpoint_whose_weights_do_not_match_its_config(tiny_checkpoint, tmp_path):
    payload = read_checkpoint(tiny_checkpoint)
    payload["model_config"]["num_classes"] = 17
    path = tmp_path / "mismatch.pth"
    torch.save(payload, path)
    with pytest.raises(InputError, match=r"mismatch\.pth: its weights do not match its own model config \(size "
                                         "mismatch for"):
        load_model(str(path))


def test_duplicate_rows_are_refused_by_training_and_mapping(tmp_path, four_tiles, tiny_checkpoint, capsys):  # noqa: F811
    rows = open(four_tiles).read().splitlines()
    doubled = tmp_path / "doubled.csv"
    doubled.write_text("\n".join(rows + [rows[2]]) + "\n")
    assert run_cli(train.main, _argv(str(doubled), tmp_path / "run", "--max_epochs", "1")) == 2
    expected = f"error: {doubled}:6: image_fn {rows[2].split(',')[0]} repeats line 3; list each tile once"
    assert _last_error(capsys) == expected
    from tests.mapping.test_cli import TEST_PY

    assert run_cli(TEST_PY.main, ["--checkpoint", tiny_checkpoint, "--list_dir", str(doubled), "--out_dir",
                                  str(tmp_path / "maps"), "--device", "cpu"]) == 2
    assert _last_error(capsys) == expected


def test_unreadable_checkpoints_never_advise_weights_only_false(tmp_path):
    import argparse

    torch.save({"model": argparse.Namespace(a=1)}, tmp_path / "objects.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    for name, reason in (("objects.pth", "it holds Python objects"), ("garbage.pth", "corrupt, or not a torch file")):
        with pytest.raises(InputError) as caught:
            read_checkpoint(str(tmp_path / name))
        message = str(caught.value)
        assert f"{name}: cannot read checkpoint: not a VCNet checkpoint ({reason}" in message
        assert "networks.convert_published" in message and "weights_only" not in message


def test_float_imagery_for_8_bit_statistics_warns_in_the_log(tmp_path, four_tiles):  # noqa: F811
    import numpy as np
    import rasterio

    from dataset import read_list
    from tests.helpers import write_geotiff, write_list

    rows = []
    for entry in read_list(four_tiles):
        with rasterio.open(entry.image) as src:
            scaled = src.read().astype(np.float32) / 255.0
        rows.append([write_geotiff(str(tmp_path / os.path.basename(entry.image)), scaled), entry.label])
    scaled_list = write_list(tmp_path / "scaled.csv", rows, columns=("image_fn", "label_fn"))
    Trainer(options(tmp_path, scaled_list, max_epochs=1)).close()
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("far from the normalisation of dataset 'sample'") == 1
