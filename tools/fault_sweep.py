"""Fault sweep (maintainers; needs root for tmpfs mounts): run each case against a checkout and classify it.

Usage: ``python tools/fault_sweep.py CHECKOUT WORK_DIR [CASE ...]``; docs/reliability.md gives the results.

Outcome classes: clean (exit 2 + one 'error:' line, no traceback, no data problem), ok (correct
handling: expected success / warning), traceback, wrong (silent wrong result), lost (data lost).
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.abspath(sys.argv[1])
WORK = os.path.abspath(sys.argv[2])
ONLY = sys.argv[3:] or None
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
SAMPLE = os.path.join(ROOT, "dataset", "sample", "train.csv")
MAPFAST = ["--device", "cpu", "--chip_size", "64", "--stride", "64", "--num_workers", "0", "--batch_size", "8"]
TRAINFAST = ["--dataset", "sample", "--model_config", "tiny", "--chip_size", "32", "--chips_per_tile", "2",
             "--num_workers", "0", "--device", "cpu", "--max_epochs", "1"]
GEO = os.path.join(ROOT, "tests", "data", "georef")
NAIP = os.path.join(GEO, "m_3907833_nw_17_1_naip-new.tif")
NLCD = os.path.join(GEO, "m_3907833_nw_17_1_nlcd.tif")


def sh(*argv, check=False, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=ENV, cwd=WORK, **kw)


def py(script, *argv):
    return sh(PY, os.path.join(ROOT, script), *argv)


def mount(path, size, ro=False):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", path], check=True)


def umount(path):
    subprocess.run(["umount", path], check=False)


def complete(path):
    r = sh(PY, "-c", "import sys,rasterio\nwith rasterio.open(sys.argv[1]) as s:\n"
                     " [s.read(window=w) for _,w in s.block_windows(1)]", path)
    return r.returncode == 0


def maps_ok(folder):
    bad = [n for n in os.listdir(folder) if n.endswith(".tif") and not complete(os.path.join(folder, n))]
    return f"incomplete under final names: {len(bad)}" if bad else None


def make_ckpts():
    code = f"""
import sys, torch
sys.path.insert(0, {ROOT!r})
from dataset import load_dataset
from networks import build_model, save_checkpoint
from networks.config import get_tiny_config
for seed, name, ds in ((0, 'a', 'sample'), (1, 'b', 'sample'), (2, 'c17', 'Chesapeake_NLCD16')):
    torch.manual_seed(seed); c = get_tiny_config(); d = load_dataset(ds); c.num_classes = d.num_classes
    save_checkpoint({WORK!r} + f'/{{name}}.pth', model=build_model(c).eval(), model_config=c, dataset=d)
p = torch.load({WORK!r} + '/a.pth', weights_only=True); p['model_config']['num_classes'] = 17
torch.save(p, {WORK!r} + '/mismatch_classes.pth')
p = torch.load({WORK!r} + '/a.pth', weights_only=True); p['model_config']['in_channels'] = 3
torch.save(p, {WORK!r} + '/mismatch_bands.pth')
import argparse
torch.save({{'model': argparse.Namespace(a=1)}}, {WORK!r} + '/objects.pth')
"""
    r = sh(PY, "-c", code)
    assert r.returncode == 0, r.stderr


CASES = []


def case(name, command):
    def wrap(fn):
        CASES.append((name, command, fn))
        return fn
    return wrap


def fresh(name):
    d = os.path.join(WORK, name)
    shutil.rmtree(d, ignore_errors=True)
    return d


# ---------------------------------------------------------------- test.py
def on_tmpfs(name, size, run, read_only=False):
    """``run(folder)`` on a fresh tmpfs of ``size``: its result and (writable) whether every raster left is whole."""
    d = fresh(name)
    mount(d, size, ro=read_only)
    try:
        result = run(d)
        return result, None if read_only else maps_ok(d)
    finally:
        umount(d)


@case("disk full while mapping", "test.py --out_dir <100 KiB tmpfs>")
def _():
    return on_tmpfs("full", "100k",
                         lambda d: py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--out_dir", d, *MAPFAST))


@case("rerun after a full disk left short maps", "test.py (same command again)")
def _():
    d = fresh("short")
    r = py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--out_dir", d, *MAPFAST)
    names = sorted(glob.glob(d + "/*.tif"))
    open(names[0], "w").close()
    os.truncate(names[1], 4096)
    r = py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--out_dir", d, *MAPFAST)
    return r, maps_ok(d)


def stale(extra_first, second_ckpt, extra_second, name):
    d = fresh(name)
    py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--out_dir", d, *MAPFAST, *extra_first)
    r = py("test.py", "--checkpoint", second_ckpt, "--list_dir", SAMPLE, "--out_dir", d, *MAPFAST, *extra_second)
    wrong = "maps of another run kept as this run's" if r.returncode == 0 and "already done" in r.stdout and \
        not r.stdout.startswith("8 tiles mapped") else None
    return r, wrong


@case("stale maps of another checkpoint", "test.py --checkpoint b.pth into a folder of a.pth's maps")
def _():
    return stale([], "b.pth", [], "stale_b")


@case("stale maps, checkpoint with 17 classes", "test.py --checkpoint c17.pth (17 classes) into a.pth's maps")
def _():
    return stale([], "c17.pth", ["--dataset", "Chesapeake_NLCD16"], "stale_c17")


@case("stale maps, other window", "test.py --stride 32 into maps made with --stride 64")
def _():
    d = fresh("stale_win")
    py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--out_dir", d, *MAPFAST)
    r = py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--out_dir", d, *MAPFAST, "--stride", "32")
    return r, ("maps of other settings kept" if r.returncode == 0 and "8 already done" in r.stdout else None)


@case("stale probability rasters", "test.py --save_probs --checkpoint b.pth, only the maps removed")
def _():
    d = fresh("stale_probs")
    py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--out_dir", d, *MAPFAST, "--save_probs")
    for p in glob.glob(d + "/*_predictions.tif"):
        os.remove(p)
    r = py("test.py", "--checkpoint", "b.pth", "--list_dir", SAMPLE, "--out_dir", d, *MAPFAST, "--save_probs")
    return r, ("probabilities of another checkpoint kept" if r.returncode == 0 else None)


@case("temporaries of a killed test.py", "kill -9 during test.py, then the same command")
def _():
    d = fresh("killed")
    os.makedirs(d)
    open(os.path.join(d, ".wv_1m_2014-m_3708020_sw_17_1-0_predictions.tif.x1y2z3.tmp"), "w").write("x")
    r = py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--out_dir", d, *MAPFAST)
    left = glob.glob(d + "/.*.tmp")
    return r, (f"{len(left)} stale temporary files left" if left else None)


@case("read-only output folder (test.py)", "test.py --out_dir <read-only mount>")
def _():
    return on_tmpfs("ro_map", "64k", lambda d: py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--out_dir", d + "/maps", *MAPFAST), read_only=True)


@case("--save_path is an existing file", "test.py --save_path FILE")
def _():
    f = os.path.join(WORK, "a_file")
    open(f, "w").write("x")
    return py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--save_path", f, *MAPFAST), None


for dev in ("cuda:0", "cuda:1", "meta"):
    case(f"--device {dev} (no GPU)", f"test.py --device {dev}")(
        lambda dev=dev: (py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--out_dir",
                            fresh("dev"), *MAPFAST, "--device", dev), None))


for kind in ("classes", "bands"):
    case(f"checkpoint weights do not match its config ({kind})", f"test.py --checkpoint mismatch_{kind}.pth")(
        lambda kind=kind: (py("test.py", "--checkpoint", f"mismatch_{kind}.pth", "--list_dir", SAMPLE, "--out_dir",
                              fresh("mm"), *MAPFAST), None))


@case("checkpoint holding Python objects", "test.py --checkpoint objects.pth")
def _():
    r = py("test.py", "--checkpoint", "objects.pth", "--list_dir", SAMPLE, "--out_dir", fresh("obj"), *MAPFAST)
    return r, ("advises weights_only=False" if "weights_only" in r.stderr else None)


def doubled_list():
    rows = open(SAMPLE).read().splitlines()
    base = os.path.join(ROOT, "dataset", "sample")
    rows = [rows[0]] + [",".join(os.path.join(base, c) for c in r.split(",")) for r in rows[1:]]
    path = os.path.join(WORK, "doubled.csv")
    open(path, "w").write("\n".join(rows + [rows[3]]) + "\n")
    return path


@case("duplicate list row (test.py)", "test.py --list_dir LIST_WITH_A_ROW_TWICE")
def _():
    return py("test.py", "--checkpoint", "a.pth", "--list_dir", doubled_list(), "--out_dir", fresh("dup"),
              *MAPFAST), None


@case("float 0-1 imagery for 0-255 statistics (test.py)", "test.py on the sample scaled to 0-1 floats")
def _():
    lst = scaled_list()
    r = py("test.py", "--checkpoint", "a.pth", "--list_dir", lst, "--out_dir", fresh("scaled_maps"), *MAPFAST)
    return r, (None if "warning:" in r.stderr else "maps nonsense without a word")


def scaled_list():
    code = f"""
import sys, os, csv, rasterio
sys.path.insert(0, {ROOT!r})
from dataset import read_list
rows = []
os.makedirs({WORK!r} + '/scaled', exist_ok=True)
for e in read_list({SAMPLE!r}, required=('image_fn', 'label_fn', 'hr_label_fn')):
    with rasterio.open(e.image) as s:
        prof = s.profile; data = s.read().astype('float32') / 255
    prof.update(dtype='float32')
    out = {WORK!r} + '/scaled/' + os.path.basename(e.image)
    with rasterio.open(out, 'w', **prof) as d:
        d.write(data)
    rows.append([out, e.label, e.hr_label])
with open({WORK!r} + '/scaled.csv', 'w', newline='') as fh:
    w = csv.writer(fh); w.writerow(['image_fn', 'label_fn', 'hr_label_fn']); w.writerows(rows)
"""
    assert sh(PY, "-c", code).returncode == 0
    return os.path.join(WORK, "scaled.csv")


# ---------------------------------------------------------------- mIoU.py
def scored_maps():
    d = os.path.join(WORK, "maps_a")
    if not os.path.isdir(d):
        py("test.py", "--checkpoint", "a.pth", "--list_dir", SAMPLE, "--out_dir", d, *MAPFAST)
    return d


@case("mIoU.py --json into a read-only folder", "mIoU.py --json <read-only mount>/m.json")
def _():
    return on_tmpfs("ro_json", "64k", lambda d: py("mIoU.py", "--pred_dir", scored_maps(), "--list_dir", SAMPLE, "--json", d + "/m.json"), read_only=True)


@case("mIoU.py --json is a folder", "mIoU.py --json FOLDER")
def _():
    return py("mIoU.py", "--pred_dir", scored_maps(), "--list_dir", SAMPLE, "--json", WORK), None


@case("mIoU.py on a folder mixing two checkpoints' maps", "mIoU.py --pred_dir <maps of a.pth and b.pth>")
def _():
    d = fresh("mixed")
    shutil.copytree(scored_maps(), d)
    b = fresh("maps_b")
    py("test.py", "--checkpoint", "b.pth", "--list_dir", SAMPLE, "--out_dir", b, *MAPFAST)
    first = sorted(glob.glob(b + "/*.tif"))[0]
    shutil.copy(first, d)
    r = py("mIoU.py", "--pred_dir", d, "--list_dir", SAMPLE)
    return r, ("scored a mix of two models as one" if r.returncode == 0 else None)


@case("auto_test.sh over maps of an earlier epoch_0.pth", "auto_test.sh --out_dir OUT run/ after retraining run/")
def _():
    out = fresh("auto")
    run = fresh("autorun")
    os.makedirs(run)
    shutil.copy(os.path.join(WORK, "a.pth"), os.path.join(run, "epoch_0.pth"))
    sh("bash", os.path.join(ROOT, "auto_test.sh"), "--list_dir", SAMPLE, "--out_dir", out, "--device", "cpu",
       "--chip_size", "64", "--stride", "64", "--python", PY, run)
    shutil.copy(os.path.join(WORK, "b.pth"), os.path.join(run, "epoch_0.pth"))
    r = sh("bash", os.path.join(ROOT, "auto_test.sh"), "--list_dir", SAMPLE, "--out_dir", out, "--device", "cpu",
           "--chip_size", "64", "--stride", "64", "--python", PY, run)
    return r, ("scored the old checkpoint's maps as the new one's" if r.returncode == 0 else None)


# ---------------------------------------------------------------- train.py
@case("train.py --overwrite over a previous run", "train.py --overwrite (folder holds epoch_0..2 of a 3-epoch run)")
def _():
    d = fresh("over")
    py("train.py", *TRAINFAST[:-1], "3", "--save_interval", "1", "--out_dir", d)
    r = py("train.py", *TRAINFAST, "--out_dir", d, "--overwrite")
    lost = [n for n in ("epoch_1.pth", "epoch_2.pth") if os.path.exists(os.path.join(d, n))]
    log = open(os.path.join(d, "train.log")).read()
    problem = None
    if lost or "epoch 3/3" in log:
        problem = f"old run's {', '.join(lost)} and log lines beside the new run"
    return r, problem


@case("two runs into one folder at once", "train.py twice, one second apart, same --out_dir")
def _():
    d = fresh("two")
    first = subprocess.Popen([PY, os.path.join(ROOT, "train.py"), *TRAINFAST[:-1], "3", "--seed", "1", "--out_dir",
                              d], env=ENV, cwd=WORK, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    r = py("train.py", *TRAINFAST[:-1], "3", "--seed", "2", "--out_dir", d)
    out, err = first.communicate()
    seeds = sh(PY, "-c", f"import torch;print(torch.load({d + '/last.pth'!r}, weights_only=True)['train_args']['seed'])")
    problem = None
    if r.returncode == 0 and first.returncode == 0:
        problem = f"both exit 0; last.pth is seed {seeds.stdout.strip()}'s"
    elif first.returncode != 0:
        problem = "the first run was broken by the second"
    return r, problem


@case("kill -9 of a run, then a new run", "kill -9 train.py, then train.py --resume")
def _():
    d = fresh("killedrun")
    first = subprocess.Popen([PY, os.path.join(ROOT, "train.py"), *TRAINFAST[:-1], "50", "--out_dir", d], env=ENV,
                             cwd=WORK, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        if os.path.exists(os.path.join(d, "last.pth")):
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    r = py("train.py", *TRAINFAST[:-1], "50", "--out_dir", d, "--resume", os.path.join(d, "last.pth"),
           "--max_epochs", "50")
    return r, None


@case("read-only output folder (train.py)", "train.py --out_dir <read-only mount>/run")
def _():
    return on_tmpfs("ro_train", "64k", lambda d: py("train.py", *TRAINFAST, "--out_dir", d + "/run"), read_only=True)


@case("--savepath is an existing file", "train.py --savepath FILE")
def _():
    f = os.path.join(WORK, "a_file")
    open(f, "w").write("x")
    return py("train.py", *TRAINFAST, "--savepath", f), None


@case("disk full while saving a checkpoint", "train.py --out_dir <600 KiB tmpfs>")
def _():
    d = fresh("full_ckpt")
    mount(d, "600k")
    try:
        r = py("train.py", *TRAINFAST, "--out_dir", d)
        bad = [n for n in os.listdir(d) if n.endswith(".pth")]
        return r, (f"{bad} under final names" if bad else None)
    finally:
        umount(d)


@case("non-finite loss", "train.py --base_lr 1e30")
def _():
    return py("train.py", *TRAINFAST, "--out_dir", fresh("nan"), "--base_lr", "1e30", "--log_interval", "1"), None


@case("--device cuda:1 (train.py, no GPU)", "train.py --device cuda:1")
def _():
    args = [a for a in TRAINFAST if a not in ("--device", "cpu")]
    return py("train.py", *args, "--out_dir", fresh("dev"), "--device", "cuda:1"), None


@case("--seed 2**70", "train.py --seed 1180591620717411303424")
def _():
    return py("train.py", *TRAINFAST, "--out_dir", fresh("seed"), "--seed", str(2**70)), None


@case("duplicate list row (train.py)", "train.py --list_dir LIST_WITH_A_ROW_TWICE")
def _():
    r = py("train.py", *TRAINFAST, "--out_dir", fresh("dup_train"), "--list_dir", doubled_list())
    return r, ("trained on the repeated tile twice without a word" if r.returncode == 0 else None)


@case("a failed run's error in train.log", "train.py --base_lr 1e30; then read train.log")
def _():
    d = fresh("nanlog")
    r = py("train.py", *TRAINFAST, "--out_dir", d, "--base_lr", "1e30", "--log_interval", "1")
    log = open(os.path.join(d, "train.log")).read() if os.path.exists(os.path.join(d, "train.log")) else ""
    return r, (None if "not finite" in log else "the error is only on the terminal")


@case("float 0-1 imagery for 0-255 statistics (train.py)", "train.py on the sample scaled to 0-1 floats")
def _():
    r = py("train.py", *TRAINFAST, "--out_dir", fresh("scaled_train"), "--list_dir", scaled_list())
    return r, (None if "far from the normalisation" in r.stderr else "trains on nonsense without a word")


# ---------------------------------------------------------------- prepare_data
def prep(*argv):
    return py("tools/prepare_data.py", *argv)


@case("disk full while aligning", "prepare_data align --out_dir <4 KiB tmpfs>")
def _():
    return on_tmpfs("full_align", "4k", lambda d: prep("align", "--lr", NLCD, "--images", NAIP, "--out_dir", d))


@case("align --skip_existing after a short label", "prepare_data align --skip_existing (label cut to 0 bytes)")
def _():
    d = fresh("skip")
    prep("align", "--lr", NLCD, "--images", NAIP, "--out_dir", d)
    open(glob.glob(d + "/*.tif")[0], "w").close()
    r = prep("align", "--lr", NLCD, "--images", NAIP, "--out_dir", d, "--skip_existing")
    return r, maps_ok(d)


for w in ("0", "-5"):
    case(f"align --window {w}", f"prepare_data align --window {w}")(
        lambda w=w: (prep("align", "--lr", NLCD, "--images", NAIP, "--out_dir", fresh("win"), "--window", w), None))


@case("read-only output folder (align)", "prepare_data align --out_dir <read-only mount>/labels")
def _():
    return on_tmpfs("ro_align", "64k", lambda d: prep("align", "--lr", NLCD, "--images", NAIP, "--out_dir", d + "/labels"), read_only=True)


def no_crs_tiles():
    d = fresh("nocrs")
    os.makedirs(d)
    code = f"""
import numpy as np, rasterio
for i in range(3):
    for suffix in ('', '_lr'):
        with rasterio.open({d!r} + f'/t{{i}}{{suffix}}.tif', 'w', driver='GTiff', width=8, height=8, count=1,
                           dtype='uint8') as dst:
            dst.write(np.ones((1, 8, 8), dtype='uint8'))
"""
    sh(PY, "-c", code)
    return d


@case("list --split random --val_fraction 0", "prepare_data list --split random --val_fraction 0")
def _():
    d = no_crs_tiles()
    r = prep("list", "--images", d + "/t?.tif", "--labels", "{dir}/{stem}_lr.tif", "--out", d + "/l/a.csv",
             "--split", "random", "--val_fraction", "0")
    return r, ("main CSV written before the failure" if os.path.exists(d + "/l/a.csv") else None)


@case("list --split spatial, tiles without CRS", "prepare_data list --split spatial (no CRS)")
def _():
    d = no_crs_tiles()
    r = prep("list", "--images", d + "/t?.tif", "--labels", "{dir}/{stem}_lr.tif", "--out", d + "/l/a.csv",
             "--split", "spatial")
    return r, ("main CSV written before the failure" if os.path.exists(d + "/l/a.csv") else None)


@case("stats --windows 10**11", "prepare_data stats --size 64 --windows 100000000000")
def _():
    return prep("stats", "--images", os.path.join(ROOT, "dataset/sample/naip/*.tif"), "--size", "64", "--windows",
                "100000000000"), None


@case("stats --out is a folder", "prepare_data stats --base sample --out FOLDER")
def _():
    return prep("stats", "--images", os.path.join(ROOT, "dataset/sample/naip/*.tif"), "--base", "sample", "--out",
                WORK), None


def classify(r, problem, expect_success):
    tb = "Traceback" in r.stderr
    last = (r.stderr.strip().splitlines() or [""])[-1]
    if tb:
        return "traceback", last
    if problem:
        return ("lost" if "under final" in problem or "beside" in problem or "seed" in problem or
                "broken" in problem or "incomplete" in problem else "wrong"), problem
    if r.returncode == 2 and last.startswith(("error:", "auto_test.sh: error:")):
        return "clean", last
    if r.returncode == 0:
        return "ok", (r.stdout.strip().splitlines() or [""])[-1]
    return "other", f"exit {r.returncode}: {last}"


if __name__ == "__main__":
    os.makedirs(WORK, exist_ok=True)
    make_ckpts()
    results = []
    for name, command, fn in CASES:
        if ONLY and not any(o in name for o in ONLY):
            continue
        start = time.time()
        r, problem = fn()
        kind, detail = classify(r, problem, False)
        results.append({"case": name, "command": command, "kind": kind, "detail": detail[:300],
                        "seconds": round(time.time() - start, 1)})
        print(json.dumps(results[-1]), flush=True)
    json.dump(results, open(os.path.join(WORK, "results.json"), "w"), indent=1)
