"""Helpers shared by the tests: repository paths, GeoTIFF and CSV writers, running a CLI ``main``."""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys

import numpy as np

from dataset.errors import run_cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(REPO_ROOT, "dataset", "sample")
SAMPLE_LIST = os.path.join(SAMPLE_DIR, "train.csv")
GEOREF_DIR = os.path.join(REPO_ROOT, "tests", "data", "georef")


def write_geotiff(path, array, crs="EPSG:26917", transform=None, nodata=None, **profile):
    """Write ``array`` ((H, W) or (C, H, W)) as a GeoTIFF with a real CRS and transform."""
    import rasterio
    from rasterio.transform import from_origin

    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if transform is None:
        transform = from_origin(500000.0, 4400000.0, 1.0, 1.0)
    meta = dict(driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                dtype=array.dtype, crs=crs, transform=transform, nodata=nodata)
    meta.update(profile)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with rasterio.open(path, "w", **meta) as dst:
        dst.write(array)
    return path


def write_list(path, rows, columns=("image_fn", "label_fn", "hr_label_fn")):
    """Write a CSV tile list with ``columns`` and ``rows``; returns its path as a string."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows(rows)
    return str(path)


#: A second process: holds the ``OutputLocks`` lock of ``out`` with a file in progress beside it until every
#: ``wait_for`` path exists, then says whether that file was left alone ("intact" or "deleted") and leaves the
#: output as if it failed (the file removed) or, given ``leave``, as if it completed (that file moved in).
LOCK_HOLDER = """
import os, sys, time
from dataset.files import OutputLocks
out, leave, wait_for = sys.argv[1], sys.argv[2], sys.argv[3:]
locks = OutputLocks(os.path.dirname(out))
assert locks.acquire(out, wait=False)
in_progress = os.path.join(os.path.dirname(out), "." + os.path.basename(out) + ".w0rk1ng.tmp")
open(in_progress, "wb").write(b"an output being written")
print("locked", flush=True)
deadline = time.time() + 120
while not all(os.path.isfile(path) for path in wait_for) and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.5)
print("intact" if os.path.isfile(in_progress) else "deleted", flush=True)
if leave:
    os.replace(leave, out)
else:
    os.remove(in_progress)
"""


def start_lock_holder(out, wait_for, leave=None) -> subprocess.Popen:
    """Start :data:`LOCK_HOLDER` for ``out``; it prints "locked" once it holds the lock."""
    return subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out), str(leave or ""), *map(str, wait_for)],
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT}, stdout=subprocess.PIPE,
                            text=True)


def run_main(main, argv, capsys):
    """Run a CLI ``main`` as the script would; returns (exit code, stdout, last stderr line + newline)."""
    code = run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().replace("\r", "\n").splitlines()
    return code, out, (lines[-1] + "\n") if lines else ""


def gdalinfo(path):
    """``gdalinfo -json PATH`` as a dict, from the GDAL library that rasterio loaded (through ctypes).

    rasterio does not expose everything GDAL reads (category names, for one); this is what a user's
    ``gdalinfo`` or QGIS sees.
    """
    import ctypes
    import glob
    import json

    import pytest
    import rasterio

    libs = glob.glob(os.path.join(os.path.dirname(rasterio.__file__), os.pardir, "rasterio.libs", "libgdal*"))
    if not libs:
        pytest.skip("rasterio is not the wheel that bundles libgdal")
    gdal = ctypes.CDLL(libs[0])  # already loaded by rasterio: the same library and drivers
    gdal.GDALOpen.restype = ctypes.c_void_p
    gdal.GDALOpen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    gdal.GDALInfoOptionsNew.restype = ctypes.c_void_p
    gdal.GDALInfoOptionsNew.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p]
    gdal.GDALInfo.restype = ctypes.c_void_p
    gdal.GDALInfo.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    for name in ("GDALInfoOptionsFree", "GDALClose", "VSIFree"):
        getattr(gdal, name).argtypes = [ctypes.c_void_p]
    gdal.GDALAllRegister()
    dataset = gdal.GDALOpen(os.fsencode(path), 0)
    assert dataset, f"GDAL cannot open {path}"
    options = gdal.GDALInfoOptionsNew((ctypes.c_char_p * 2)(b"-json", None), None)
    text = gdal.GDALInfo(dataset, options)
    try:
        return json.loads(ctypes.string_at(text).decode("utf-8"))
    finally:
        gdal.VSIFree(text)
        gdal.GDALInfoOptionsFree(options)
        gdal.GDALClose(dataset)


@contextlib.contextmanager
def mounted_tmpfs(path, size="200k", read_only=False):
    """A small tmpfs at ``path`` (a full disk, or with ``read_only`` a read-only one) for the block.

    Needs root; the test is skipped, saying why, when it is not root or the mount fails.
    """
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield str(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)  # still busy: detach it now, free it later
