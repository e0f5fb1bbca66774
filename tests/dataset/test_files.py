"""dataset/files.py: atomic outputs that fail with one line naming the file, stale temporaries, output checks."""

from __future__ import annotations

import errno
import os

import pytest

import dataset.files
from dataset.errors import InputError, run_cli
from dataset.files import OutputLocks, atomic_output, check_output_file, check_output_folder, remove_stale_temporaries


def test_a_full_disk_inside_atomic_output_names_the_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(InputError, match=rf"^{target}: cannot write \(No space left on device\); nothing was saved"):
        with atomic_output(str(target)) as tmp:
            open(tmp, "w").write("{")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []


def test_a_failed_flush_before_the_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dataset.files, "_sync", full)
    with pytest.raises(InputError, match="No space left on device"):
        with atomic_output(str(target)) as tmp:
            open(tmp, "w").write("new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_other_errors_inside_atomic_output_are_not_disguised(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_output(str(tmp_path / "x")):
            open(tmp_path / "missing_input")


def test_output_checks_name_the_flag_and_create_nothing(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(InputError, match=f"^--out_dir {a_file}: is a file, not a folder$"):
        check_output_folder(str(a_file), "--out_dir")
    with pytest.raises(InputError, match=f"^--out_dir {a_file}/sub: {a_file} is a file, not a folder$"):
        check_output_folder(str(a_file / "sub"), "--out_dir")
    with pytest.raises(InputError, match=f"^--json {tmp_path}: is a folder; give a file name$"):
        check_output_file(str(tmp_path), "--json")
    check_output_folder(str(tmp_path / "new" / "deeper"), "--out_dir")
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_only_our_stale_temporaries_are_removed(tmp_path):
    ours = [tmp_path / ".m[1].tif.ab12cd.tmp", tmp_path / ".m[1].tif.zz.tmp"]
    others = [tmp_path / ".m[1].tiff.ab.tmp", tmp_path / "m[1].tif", tmp_path / ".other.tif.ab.tmp"]
    for path in ours + others:
        path.write_text("x")
    assert remove_stale_temporaries([str(tmp_path / "m[1].tif")]) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in others)


def test_run_cli_turns_a_file_system_refusal_into_one_line(capsys):
    def main(argv):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/out.tif")

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err == "error: /data/out.tif: Permission denied\n"


def test_output_locks_follow_a_lock_file_that_a_finished_run_removed(tmp_path):
    locks = OutputLocks(str(tmp_path / "maps"))
    lock_file = tmp_path / "maps" / ".outputs.lock"
    assert locks.acquire(str(tmp_path / "maps" / "a.tif"), wait=False) and lock_file.exists()
    locks.release(str(tmp_path / "maps" / "a.tif"))
    os.remove(lock_file)  # what the last other run to finish does
    assert locks.acquire(str(tmp_path / "maps" / "b.tif"), wait=True)
    assert lock_file.exists() and locks._is_current()  # the lock is taken in the file others now open
    locks.release(str(tmp_path / "maps" / "b.tif"))
    locks.close()
    assert os.listdir(tmp_path / "maps") == []  # no other holder: the lock file goes with the run
