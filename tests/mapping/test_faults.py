"""Faults while mapping and scoring (docs/reliability.md): full disks, short files under final names,
stale maps of another checkpoint, unwritable outputs, leftovers of a killed run."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import rasterio
import torch

import mapping.writer
from dataset import read_list
from dataset.errors import run_cli
from dataset.raster_io import raster_problem
from mapping.writer import PROVENANCE_TAG, output_name
from networks import read_checkpoint, save_checkpoint
from networks.config import get_tiny_config
from tests.helpers import mounted_tmpfs, start_lock_holder, write_geotiff, write_list
from tests.mapping.test_cli import FAST, MIOU_PY, TEST_PY, crops, run  # noqa: F401 (crops is a fixture)


def _maps(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tif"))


def _all_complete(folder):
    return all(raster_problem(os.path.join(folder, n)) is None for n in _maps(folder))


@pytest.fixture(scope="module")
def other_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with other weights (another training run)."""
    payload = read_checkpoint(tiny_checkpoint)
    torch.manual_seed(1)
    from networks import build_model

    model = build_model(get_tiny_config())
    path = str(tmp_path_factory.mktemp("other") / "other.pth")
    save_checkpoint(path, model=model, model_config=payload["model_config"], dataset=payload["dataset"])
    return path


def test_silent_gdal_write_failure_leaves_no_map(crops, tiny_checkpoint, tmp_path, capsys, monkeypatch):  # noqa: F811
    """GDAL may report a failed block write only on stderr and close "successfully": simulated here by
    cutting the file after close, as a full disk did (0-byte and 4 KB maps under final names)."""
    real = mapping.writer._open_output

    @contextlib.contextmanager
    def short_file(path, *args, **kwargs):
        with real(path, *args, **kwargs) as dst:
            yield dst
        os.truncate(path, 4096)

    monkeypatch.setattr(mapping.writer, "_open_output", short_file)
    save = tmp_path / "maps"
    code, out, err = run(TEST_PY, ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir", save, *FAST],
                         capsys)
    first = output_name(read_list(crops)[0].image)
    assert code == 2 and err.startswith(f"error: {save / first}: the class map could not be completely written")
    assert "tiles mapped" not in out and not os.listdir(save)  # nothing under a final name, no temporary


def test_disk_full_while_mapping(crops, tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    """A real full disk: a 32 KiB tmpfs holds some of the three maps with their probabilities."""
    with mounted_tmpfs(tmp_path / "small", "32k") as save:
        code, _, err = run(TEST_PY, ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir", save,
                                     "--save_probs", *FAST], capsys)
        assert code == 2 and "no space left on the device" in err and "nothing was saved under this name" in err
        assert _all_complete(save) and not [n for n in os.listdir(save) if n.endswith(".tmp")]


def test_rerun_remaps_incomplete_maps(crops, tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    """Maps that an older version left short under their final names are mapped again, not kept."""
    argv = ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir", tmp_path, *FAST]
    assert run(TEST_PY, argv, capsys)[0] == 0
    names = _maps(tmp_path)
    open(tmp_path / names[0], "w").close()  # 0 bytes
    os.truncate(tmp_path / names[1], 4096)
    code, out, _ = run(TEST_PY, argv, capsys)
    assert code == 0 and "2 tiles mapped, 1 already done" in out and _all_complete(tmp_path)


def test_a_rerun_reads_each_complete_map_once(crops, tiny_checkpoint, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Reading a map back in full is the cost of a rerun: a complete one is checked once, not again under its lock."""
    import mapping.run

    argv = ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir", tmp_path, *FAST]
    assert run(TEST_PY, argv, capsys)[0] == 0
    names = _maps(tmp_path)
    os.remove(tmp_path / names[0])
    checked = []
    real = mapping.run.output_state
    monkeypatch.setattr(mapping.run, "output_state", lambda path, *a: checked.append(path) or real(path, *a))
    code, out, _ = run(TEST_PY, argv, capsys)
    assert code == 0 and "1 tiles mapped, 2 already done" in out
    # the missing map twice (before any work, then under its lock), each complete one once
    assert sorted(os.path.basename(p) for p in checked) == sorted([names[0], *names])


def test_stale_temporaries_of_a_killed_run_are_removed(crops, tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    name = output_name(read_list(crops)[0].image)
    stale = tmp_path / f".{name}.k1ll3d.tmp"
    stale.write_bytes(b"half a map")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("not ours")
    assert run(TEST_PY, ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir", tmp_path, *FAST],
               capsys)[0] == 0
    assert not stale.exists() and unrelated.exists()


@pytest.mark.parametrize("change", ["checkpoint", "window", "probabilities"])
def test_maps_of_another_checkpoint_or_window_are_refused(crops, tiny_checkpoint, other_checkpoint, tmp_path,  # noqa: F811
                                                           capsys, change):
    base = ["--list_dir", crops, "--out_dir", tmp_path, *FAST, "--save_probs"]
    assert run(TEST_PY, ["--checkpoint", tiny_checkpoint, *base], capsys)[0] == 0
    before = {n: os.path.getmtime(tmp_path / n) for n in _maps(tmp_path)}
    argv = {"checkpoint": ["--checkpoint", other_checkpoint, *base],
            "window": ["--checkpoint", tiny_checkpoint, *base, "--stride", "64"],
            "probabilities": ["--checkpoint", other_checkpoint, *base]}[change]
    if change == "probabilities":  # only the probability raster is another run's
        first = output_name(read_list(crops)[0].image)
        os.remove(tmp_path / first)
    code, _, err = run(TEST_PY, argv, capsys)
    assert code == 2 and "not by this run" in err and "--overwrite" in err
    if change == "probabilities":
        assert "_probs.tif: made with checkpoint sha256" in err
    assert {n: os.path.getmtime(tmp_path / n) for n in _maps(tmp_path)} == {n: t for n, t in before.items()
                                                                             if n in _maps(tmp_path)}
    code, out, _ = run(TEST_PY, argv + ["--overwrite"], capsys)
    assert code == 0 and "3 tiles mapped" in out
    with rasterio.open(tmp_path / _maps(tmp_path)[0]) as src:
        tag = src.tags()[PROVENANCE_TAG]
    assert ('"stride": 64' in tag) == (change == "window")


def test_miou_refuses_a_folder_of_mixed_maps(crops, tiny_checkpoint, other_checkpoint, tmp_path, capsys):  # noqa: F811
    a, b = tmp_path / "a", tmp_path / "b"
    for ckpt, folder in ((tiny_checkpoint, a), (other_checkpoint, b)):
        assert run(TEST_PY, ["--checkpoint", ckpt, "--list_dir", crops, "--out_dir", folder, *FAST], capsys)[0] == 0
    second = output_name(read_list(crops)[1].image)
    os.replace(b / second, a / second)
    code, _, err = run(MIOU_PY, ["--pred_dir", a, "--list_dir", crops], capsys)
    assert code == 2 and f"{a / second}: made with checkpoint sha256" in err and "score maps of one checkpoint" in err
    os.replace(a / second, b / second)
    code, _, _ = run(MIOU_PY, ["--pred_dir", b, "--list_dir", crops, "--json", tmp_path / "m.json"], capsys)
    assert code == 0 and '"maps_made_by": "checkpoint sha256' in (tmp_path / "m.json").read_text()


def test_unwritable_outputs_fail_before_work(crops, tiny_checkpoint, tmp_path, capsys, monkeypatch):  # noqa: F811
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = run(TEST_PY, ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--save_path", a_file, *FAST],
                       capsys)
    assert code == 2 and err == f"error: --out_dir {a_file}: is a file, not a folder\n"
    # mIoU.py --json naming a folder fails before any scoring, not after it.
    import scoring.report

    monkeypatch.setattr(scoring.report, "evaluate_pairs", lambda *a, **k: pytest.fail("scored first"))
    code, _, err = run(MIOU_PY, ["--pred_dir", tmp_path, "--list_dir", crops, "--json", tmp_path], capsys)
    assert code == 2 and err == f"error: --json {tmp_path}: is a folder; give a file name\n"


def test_read_only_output_folders(crops, tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    with mounted_tmpfs(tmp_path / "ro", read_only=True) as ro:
        code, _, err = run(TEST_PY, ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir",
                                     os.path.join(ro, "maps"), *FAST], capsys)
        assert code == 2 and err.startswith(f"error: --out_dir {ro}/maps: cannot write in this folder (Read-only")
        code, _, err = run(MIOU_PY, ["--pred_dir", tmp_path, "--list_dir", crops, "--json",
                                     os.path.join(ro, "m.json")], capsys)
        assert code == 2 and err.startswith(f"error: --json {ro}/m.json: cannot write in this folder (Read-only")


def test_float_imagery_for_8_bit_statistics_warns(crops, tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    rows = []
    for entry in read_list(crops):
        with rasterio.open(entry.image) as src:
            scaled = src.read().astype(np.float32) / 255.0
        rows.append([write_geotiff(str(tmp_path / os.path.basename(entry.image)), scaled), entry.label,
                     entry.hr_label])
    argv = ["--checkpoint", tiny_checkpoint, "--out_dir", tmp_path / "maps", *FAST]
    assert run_cli(TEST_PY.main, [str(a) for a in argv + ["--list_dir", write_list(tmp_path / "s.csv", rows)]]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "far from the normalisation of dataset 'sample'" in err and "0-1 floats" in err
    assert run_cli(TEST_PY.main, [str(a) for a in argv + ["--list_dir", crops, "--out_dir", tmp_path / "m2"]]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_auto_test_checks_its_output_folder_first(crops, tiny_checkpoint, tmp_path):  # noqa: F811
    from tests.mapping.test_cli import _auto_test

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    done = _auto_test(["--list_dir", crops, "--out_dir", a_file, tiny_checkpoint], tmp_path)
    assert done.returncode == 2 and done.stderr == f"auto_test.sh: error: --out_dir {a_file}: is a file, not a folder\n"
    with mounted_tmpfs(tmp_path / "ro", read_only=True) as ro:
        done = _auto_test(["--list_dir", crops, "--out_dir", os.path.join(ro, "res"), tiny_checkpoint], tmp_path)
        assert done.returncode == 2 and "cannot write in this folder" in done.stderr


@pytest.mark.parametrize("holder_leaves", ["nothing", "the same map", "another checkpoint's map"])
def test_a_map_another_run_is_writing_is_left_alone_then_checked(crops, tiny_checkpoint, other_checkpoint,  # noqa: F811
                                                                 tmp_path, capsys, holder_leaves):
    # Another process holds the first tile's lock with a write in progress until the test's run has written
    # the other two maps (so it is waiting for the first); then it leaves what the case says.
    names = [output_name(e.image) for e in read_list(crops)]
    made = {"the same map": tiny_checkpoint, "another checkpoint's map": other_checkpoint}.get(holder_leaves)
    leave = None
    if made:
        assert run(TEST_PY, ["--checkpoint", made, "--list_dir", crops, "--out_dir", tmp_path / "made", *FAST],
                   capsys)[0] == 0
        leave = tmp_path / "made" / names[0]
    save = tmp_path / "save"
    holder = start_lock_holder(save / names[0], [save / names[1], save / names[2]], leave)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out, err = run(TEST_PY, ["--checkpoint", tiny_checkpoint, "--list_dir", crops, "--out_dir", save,
                                       *FAST], capsys)
        assert holder.stdout.readline().strip() == "intact"  # the other run's file in progress was not removed
    finally:
        holder.wait(timeout=120)
    assert f"waiting for {save / names[0]}: another process is mapping it" in out
    if holder_leaves == "another checkpoint's map":
        assert code == 2 and f"{save / names[0]}: made with checkpoint sha256" in err and "not by this run" in err
    else:
        done = "3 tiles mapped, 0 already done" if holder_leaves == "nothing" else "2 tiles mapped, 1 already done"
        assert code == 0 and done in out and _all_complete(save)
    assert sorted(n for n in os.listdir(save) if not n.endswith(".aux.xml")) == sorted(names)  # no lock file left
