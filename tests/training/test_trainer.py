"""Training end to end on the real sample with the tiny model: CLI, checkpoints, schedule, resume,
auxiliary loss, validation, pretrained blocks and bad input (exit status 2, one line)."""

from __future__ import annotations

import csv
import glob
import os
import shutil

import numpy as np
import pytest
import rasterio
import torch

import train
from dataset import read_list
from dataset.errors import run_cli
from networks import load_model, read_checkpoint
from networks.checkpoint import model_from_checkpoint
from networks.label_model import LabelModelVote
from tests.helpers import SAMPLE_LIST, write_geotiff, write_list
from training.options import TrainOptions
from training.sampling import poly_lr
from training.trainer import Trainer, epoch_seed


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from a second thread, and on a busy 2-core machine OpenMP's
    thread barriers can stall for seconds per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def four_tiles(tmp_path_factory):
    """Four real sample tiles, absolute paths (with their HR references)."""
    entries = read_list(SAMPLE_LIST)[:4]
    folder = tmp_path_factory.mktemp("lists")
    return write_list(folder / "four.csv", [(e.image, e.label, e.hr_label) for e in entries])


def options(tmp_path, list_dir, **kw) -> TrainOptions:
    base = dict(dataset="sample", list_dir=list_dir, model_config="tiny", chip_size=32, chips_per_tile=2,
                batch_size=2, max_epochs=2, num_workers=0, out_dir=str(tmp_path / "run"), save_interval=1,
                log_interval=2)
    base.update(kw)
    return TrainOptions(**base)


class KeepsEachLast(Trainer):
    """Trainer that keeps a copy of ``last.pth`` after every epoch (``last_<epoch>.pth``), to resume
    from the middle of a run (the ``epoch_N.pth`` snapshots hold no optimiser state)."""

    def save(self, epoch, stats):
        written = super().save(epoch, stats)
        shutil.copyfile(self.folder.last, os.path.join(self.folder.path, f"last_{epoch}.pth"))
        return written


class Recording(KeepsEachLast):
    """Trainer that remembers the lr and chips of every step."""

    def train_step(self, batch):
        self.seen = getattr(self, "seen", [])
        terms, lr = super().train_step(batch)
        self.seen.append((lr, batch.chips.tolist(), float(terms.total.detach())))
        return terms, lr


def cli_error(capsys, argv):
    code = run_cli(train.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    return err[-1]


def test_cli_trains_sample_and_writes_checkpoints(tmp_path, four_tiles, capsys):
    save = tmp_path / "run"
    argv = ["--dataset", "sample", "--list_dir", four_tiles, "--model_config", "tiny", "--chip_size", "32",
            "--chips_per_tile", "2", "--max_epochs", "3", "--save_interval", "2", "--num_workers", "2",
            "--savepath", str(save), "--device", "cpu", "--amp"]
    assert run_cli(train.main, argv) == 0
    err = capsys.readouterr().err
    assert "--amp needs CUDA" in err
    assert sorted(glob.glob("*", root_dir=save)) == ["epoch_0.pth", "epoch_2.pth", "last.pth", "run_config.json",
                                                     "tensorboard", "train.log"]
    payload = read_checkpoint(str(save / "last.pth"))
    assert payload["epoch"] == 2 and payload["step"] == 3 * 4 and payload["total_steps"] == 12
    assert payload["dataset"]["name"] == "sample" and payload["model_config"]["img_size"] == 32
    assert payload["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert payload["optimizer"]["param_groups"][0]["weight_decay"] == 1e-4
    model = load_model(str(save / "epoch_2.pth"))
    assert model.config.l2hnet.width == 8 and model.config.num_classes == 5
    log = (save / "train.log").read_text()
    assert "epoch 3/3: loss" in log and "poly horizon 12 steps" in log
    assert os.listdir(save / "tensorboard")
    # A second run in the same folder must not overwrite it silently.
    message = cli_error(capsys, argv)
    assert "last.pth" in message and "--resume" in message


def test_schedule_is_poly_over_true_optimizer_steps(tmp_path, four_tiles):
    trainer = Recording(options(tmp_path, four_tiles, max_epochs=2, batch_size=4, chips_per_tile=3))
    summary = trainer.fit()
    total = trainer.total_steps
    assert total == 2 * 3  # 4 tiles x 3 chips = 12 chips = 3 batches of 4 per epoch
    lrs = [lr for lr, _, _ in trainer.seen]
    assert lrs == [poly_lr(0.01, t, total) for t in range(total)]
    assert lrs[0] == 0.01 and lrs[-1] < 0.01 * (1 / total) ** 0.9 + 1e-12
    assert summary["step"] == total
    # Every tile is visited once per epoch, chips differ between epochs.
    per_epoch = [sorted(c for _, chips, _ in trainer.seen[e * 3:(e + 1) * 3] for c in chips) for e in range(2)]
    assert [sorted({c[0] for c in chips}) for chips in per_epoch] == [[0, 1, 2, 3]] * 2
    assert per_epoch[0] != per_epoch[1]


def test_published_lr_scaling_is_applied(tmp_path, four_tiles):
    trainer = Trainer(options(tmp_path, four_tiles, batch_size=6, chips_per_tile=3, max_epochs=1))
    trainer.close()
    assert trainer.base_lr == pytest.approx(0.01 * 6 / 24)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, four_tiles):
    full = Recording(options(tmp_path / "a", four_tiles, max_epochs=2))
    full.fit()
    first = str(tmp_path / "a" / "run" / "last_0.pth")
    resumed = Recording(options(tmp_path / "b", four_tiles, max_epochs=2, resume=first))
    assert resumed.start_epoch == 1 and resumed.step == 4
    resumed.fit()
    assert resumed.seen == full.seen[4:]  # same lr, same chips, same loss at every step
    a = read_checkpoint(str(tmp_path / "a" / "run" / "last.pth"))
    b = read_checkpoint(str(tmp_path / "b" / "run" / "last.pth"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"])


def test_resume_with_other_settings_is_refused(tmp_path, four_tiles, capsys):
    Trainer(options(tmp_path, four_tiles, max_epochs=1)).fit()
    last = str(tmp_path / "run" / "last.pth")
    argv = ["--dataset", "sample", "--list_dir", four_tiles, "--model_config", "tiny", "--chip_size", "32",
            "--chips_per_tile", "2", "--max_epochs", "1", "--num_workers", "0", "--out_dir", str(tmp_path / "run"),
            "--resume", last]
    assert run_cli(train.main, argv) == 0  # finished run: nothing left to do
    message = cli_error(capsys, argv[:-2] + ["--batch_size", "4", "--resume", last])
    assert "--batch_size 4" in message and last in message
    message = cli_error(capsys, argv[:-2] + ["--CNN_width", "16", "--resume", last])
    assert "model config" in message
    model_only = str(tmp_path / "model_only.pth")
    payload = read_checkpoint(last)
    torch.save({k: payload[k] for k in ("format", "version", "model_config", "dataset", "state_dict")}, model_only)
    message = cli_error(capsys, argv[:-2] + ["--resume", model_only])
    assert "not a training checkpoint" in message
    # a checkpoint from before the recipe options existed trained with their published values
    older = str(tmp_path / "older.pth")
    payload = read_checkpoint(last)
    for name in ("jitter", "gce_q", "focal_gamma", "refine_labels", "refine_targets", "refine_balance", "refine_seeds",
                 "refine_jitter", "focus_chips"):
        del payload["train_args"][name]
    del payload["dataset"]["non_vegetated_class"]  # a definition field added later is compared only when saved
    torch.save(payload, older)
    assert run_cli(train.main, argv[:-1] + [older]) == 0
    message = cli_error(capsys, argv[:-2] + ["--jitter", "0.1", "--resume", older])
    assert "--jitter 0.1 differs from the checkpoint's 0.0" in message
    # the dataset definition: its prose may be edited between runs, its tables may not
    import json

    from dataset import load_dataset

    edited = load_dataset("sample").to_dict()
    edited["description"] += " (edited)"
    edited["lr_label"]["notes"] = "rewritten"
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    argv[1] = str(tmp_path / "edited.json")
    assert run_cli(train.main, argv) == 0
    edited["lr_label"]["lookup"]["21"] = 2
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    assert "not this definition" in cli_error(capsys, argv)


def test_aux_loss_and_validation(tmp_path, four_tiles):
    entries = read_list(SAMPLE_LIST)
    val = write_list(tmp_path / "val.csv", [(entries[5].image, "", entries[5].hr_label)])
    trainer = Trainer(options(tmp_path, four_tiles, max_epochs=1, aux_loss=True, chip_size=64, val_list=val))
    summary = trainer.fit()
    stats = summary["epochs"][0]
    assert stats["loss_aux"] > 0
    assert 0 <= stats["val_overall_accuracy"] <= 1 and 0 <= stats["val_mean_iou"] <= 1
    payload = read_checkpoint(str(tmp_path / "run" / "last.pth"))
    assert any(k.startswith("auxiliary_head.") for k in payload["state_dict"])
    assert os.path.isfile(tmp_path / "run" / "val" / os.listdir(tmp_path / "run" / "val")[0])


def test_pretrained_blocks_are_loaded(tmp_path, four_tiles):
    from networks import build_model, get_tiny_config

    config = get_tiny_config()
    donor = build_model(config)
    blocks = {k[len("backbone."):]: v + 1.0 for k, v in donor.state_dict().items() if k.startswith("backbone.blocks.")}
    path = str(tmp_path / "deit.pth")
    torch.save({"model": {**blocks, "cls_token": torch.zeros(1, 1, 24)}}, path)
    trainer = Trainer(options(tmp_path, four_tiles, pretrained=path))
    trainer.close()
    state = trainer.model.state_dict()
    for key, value in blocks.items():
        assert torch.equal(state["backbone." + key], value)


# ---------------------------------------------------------------------------- pinned behaviour


def test_optimizer_steps_at_the_poly_lr(tmp_path, four_tiles):
    """The lr the optimiser holds when it steps (not only the one train_step reports) follows the
    poly schedule of the scaled base lr, and the checkpoint keeps the lr of the last step."""
    trainer = Trainer(options(tmp_path, four_tiles, max_epochs=2, batch_size=6, chips_per_tile=3))
    optimizer = trainer.optimizer
    step, seen = optimizer.step, []

    def spying_step(*args, **kwargs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return step(*args, **kwargs)

    optimizer.step = spying_step
    trainer.fit()
    base, total = 0.01 * 6 / 24, 4  # batch 6: published scaling; 12 chips = 2 batches per epoch
    assert trainer.total_steps == total and len(optimizer.param_groups) == 1
    assert seen == [[pytest.approx(poly_lr(base, t, total), rel=1e-12)] for t in range(total)]
    assert seen[0][0] != 0.01 and seen[-1][0] < seen[0][0]  # neither the SGD default nor constant
    payload = read_checkpoint(str(tmp_path / "run" / "last.pth"))
    assert payload["optimizer"]["param_groups"][0]["lr"] == pytest.approx(poly_lr(base, total - 1, total), rel=1e-12)


class LossCapture(Trainer):
    """Trainer that keeps, for every step, the model's own outputs, the labels and the loss terms."""

    def train_step(self, batch):
        self.captured = getattr(self, "captured", [])
        outputs = []
        hook = self.model.register_forward_hook(
            lambda module, args, out: outputs.append(tuple(o.detach().clone() for o in out)))
        try:
            terms, lr = super().train_step(batch)
        finally:
            hook.remove()
        self.captured.append((outputs, batch.label.long().clone(), terms))
        return terms, lr


def test_loss_terms_use_the_model_output_order(tmp_path, four_tiles):
    """The model returns (vit, cnn): the CNN term is the CE of the CNN logits on every labelled
    pixel, the ViT term the CE of the ViT logits where argmax(cnn) equals the label."""
    trainer = LossCapture(options(tmp_path, four_tiles, max_epochs=1))
    trainer.fit()
    partial_agreement = False
    for outputs, label, terms in trainer.captured:
        assert len(outputs) == 1  # one forward pass per step
        vit, cnn = outputs[0]
        labelled = label != 0
        agree = labelled & (cnn.argmax(dim=1) == label)
        cnn_ce = torch.nn.functional.cross_entropy(cnn, label, reduction="none")
        vit_ce = torch.nn.functional.cross_entropy(vit, label, reduction="none")
        expected_cnn = cnn_ce[labelled].mean().item()
        expected_vit = vit_ce[agree].mean().item() if agree.any() else 0.0
        assert terms.cnn.item() == pytest.approx(expected_cnn, rel=1e-5)
        assert terms.vit.item() == pytest.approx(expected_vit, rel=1e-5, abs=1e-7)
        assert terms.total.item() == pytest.approx(0.5 * expected_cnn + 0.5 * expected_vit, rel=1e-5)
        partial_agreement |= 0 < int(agree.sum()) < int(labelled.sum())
    assert partial_agreement  # the agreement mask really selects a part of the labelled pixels


def test_validation_maps_with_half_chip_stride(tmp_path, four_tiles, monkeypatch):
    """The val map equals an independent mapping of the same weights at stride chip/2."""
    import training.validation as validation_module
    from mapping.writer import map_tile, output_name

    calls = []

    def spying_map_tile(*args, **kwargs):
        calls.append(kwargs)
        return map_tile(*args, **kwargs)

    monkeypatch.setattr(validation_module, "map_tile", spying_map_tile)
    entry = read_list(SAMPLE_LIST)[5]
    val = write_list(tmp_path / "val.csv", [(entry.image, "", entry.hr_label)])
    trainer = Trainer(options(tmp_path, four_tiles, max_epochs=1, chip_size=64, val_list=val))
    trainer.fit()  # validation runs after the last epoch, with the final weights
    assert [(c["chip_size"], c["stride"]) for c in calls] == [(64, 32)]
    maps = {}
    for stride in (32, 64):
        out = map_tile(trainer.model, entry.image, str(tmp_path / f"stride{stride}.tif"), dataset=trainer.dataset,
                       chip_size=64, stride=stride, device=trainer.device)
        with rasterio.open(out) as src:
            maps[stride] = src.read(1)
    with rasterio.open(tmp_path / "run" / "val" / output_name(entry.image)) as src:
        val_map = src.read(1)
    np.testing.assert_array_equal(val_map, maps[32])
    assert not np.array_equal(val_map, maps[64])  # the comparison can tell the two strides apart


def test_epoch_seed_differs_by_epoch_and_rank():
    seeds = {(epoch, rank): epoch_seed(1234, epoch, rank) for epoch in range(5) for rank in range(4)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= s < 2**62 for s in seeds.values())
    assert epoch_seed(1234, 3, 1) == seeds[3, 1]  # a pure function of (seed, epoch, rank)
    assert epoch_seed(1235, 0, 0) != seeds[0, 0]


class EpochRng(KeepsEachLast):
    """Trainer that records the global torch RNG state (dropout's) at the first step of every epoch."""

    def train_epoch(self, epoch):
        self.rng_states = getattr(self, "rng_states", {})
        self._epoch = epoch
        return super().train_epoch(epoch)

    def train_step(self, batch):
        self.rng_states.setdefault(self._epoch, torch.random.get_rng_state().clone())
        return super().train_step(batch)


def test_dropout_rng_is_reseeded_per_epoch(tmp_path, four_tiles):
    """Each epoch draws other dropout masks; a repeated or resumed run draws the same ones."""
    full = EpochRng(options(tmp_path / "a", four_tiles, max_epochs=2))
    full.fit()
    assert sorted(full.rng_states) == [0, 1]
    assert not torch.equal(full.rng_states[0], full.rng_states[1])
    again = EpochRng(options(tmp_path / "b", four_tiles, max_epochs=1))
    again.fit()
    assert torch.equal(again.rng_states[0], full.rng_states[0])
    resumed = EpochRng(options(tmp_path / "c", four_tiles, max_epochs=2,
                               resume=str(tmp_path / "a" / "run" / "last_0.pth")))
    resumed.fit()
    assert sorted(resumed.rng_states) == [1]
    assert torch.equal(resumed.rng_states[1], full.rng_states[1])


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_tiles(tmp_path_factory):
    """Rasters with one fault each, next to a good tile."""
    folder = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, (4, 64, 64), dtype=np.uint8)
    label = np.full((64, 64), 41, dtype=np.uint8)
    paths = {
        "image": write_geotiff(str(folder / "img.tif"), image),
        "label": write_geotiff(str(folder / "lab.tif"), label),
        "small_label": write_geotiff(str(folder / "lab_small.tif"), label[:48]),
        "three_band": write_geotiff(str(folder / "img3.tif"), image[:3]),
        "bad_codes": write_geotiff(str(folder / "lab_codes.tif"), np.where(label > 0, 7, 0).astype(np.uint8)),
        "nodata": write_geotiff(str(folder / "lab_nodata.tif"), np.zeros((64, 64), np.uint8)),
        "small_image": write_geotiff(str(folder / "img_small.tif"), image[:, :16, :16]),
        "small_image_label": write_geotiff(str(folder / "lab_small16.tif"), label[:16, :16]),
    }
    corrupt = folder / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x17" * 300)
    paths["corrupt"] = str(corrupt)
    truncated = folder / "truncated.tif"
    big = write_geotiff(str(folder / "big.tif"), rng.integers(1, 255, (4, 512, 512), dtype=np.uint8))
    truncated.write_bytes(open(big, "rb").read()[:400_000])
    paths["truncated"] = str(truncated)
    paths["big_label"] = write_geotiff(str(folder / "big_lab.tif"), np.full((512, 512), 41, np.uint8))
    return paths


def run_bad(capsys, tmp_path, rows=None, columns=("image_fn", "label_fn"), extra=()):
    argv = ["--dataset", "sample", "--model_config", "tiny", "--chip_size", "32", "--chips_per_tile", "2",
            "--max_epochs", "1", "--num_workers", "0", "--out_dir", str(tmp_path / "run")]
    if rows is not None:
        argv += ["--list_dir", write_list(tmp_path / "list.csv", rows, columns)]
    return cli_error(capsys, argv + list(extra))


@pytest.mark.parametrize("case,rows,expect", [
    ("missing tile", [("img.tif", "nowhere.tif")], ["nowhere.tif", "not found"]),
    ("corrupt image", [("corrupt.tif", "lab.tif")], ["corrupt.tif", "cannot open image"]),
    ("truncated image", [("truncated.tif", "big_lab.tif")], ["truncated.tif", "cannot read"]),
    ("size mismatch", [("img.tif", "lab_small.tif")], ["lab_small.tif", "differs from"]),
    ("band count", [("img3.tif", "lab.tif")], ["img3.tif", "3 bands", "expects 4"]),
    ("unknown codes", [("img.tif", "lab_codes.tif")], ["lab_codes.tif", "[7]"]),
    ("all no-data", [("img.tif", "lab_nodata.tif")], ["no valid 32 chip"]),
    ("all too small", [("img_small.tif", "lab_small16.tif")], ["no tile is at least 32x32"]),
])
def test_bad_tiles_fail_with_one_line(capsys, tmp_path, bad_tiles, case, rows, expect):
    folder = os.path.dirname(bad_tiles["image"])
    rows = [tuple(os.path.join(folder, p) for p in row) for row in rows]
    message = run_bad(capsys, tmp_path, rows)
    assert message.startswith("error: ")
    for part in expect:
        assert part in message, (case, message)


def test_bad_lists_and_values(capsys, tmp_path, bad_tiles):
    good = [(bad_tiles["image"], bad_tiles["label"])]
    assert "missing columns ['label_fn']" in run_bad(capsys, tmp_path, [(bad_tiles["image"],)], ("image_fn",))
    assert "has no tiles" in run_bad(capsys, tmp_path, [])
    missing = str(tmp_path / "none.csv")
    assert missing in run_bad(capsys, tmp_path, extra=["--list_dir", missing])
    assert "unknown dataset 'nope'" in run_bad(capsys, tmp_path, good, extra=["--dataset", "nope"])
    assert "--batch_size 1" in run_bad(capsys, tmp_path, good, extra=["--batch_size", "1"])
    assert "--chip_size 100" in run_bad(capsys, tmp_path, good, extra=["--chip_size", "100"])
    assert "--CNN_width 30" in run_bad(capsys, tmp_path, good, extra=["--model_config", "vcnet", "--CNN_width", "30"])
    assert "cannot fill a batch" in run_bad(capsys, tmp_path, good, extra=["--chips_per_tile", "1"])
    resume = str(tmp_path / "no.pth")
    assert resume in run_bad(capsys, tmp_path, good, extra=["--resume", resume])
    pretrained = str(tmp_path / "deit.pth")
    assert pretrained in run_bad(capsys, tmp_path, good, extra=["--pretrained", pretrained])
    no_hr = write_list(tmp_path / "val.csv", good, ("image_fn", "label_fn"))
    assert "hr_label_fn" in run_bad(capsys, tmp_path, good, extra=["--val_list", no_hr])


def test_small_tiles_are_reported_once_and_skipped(tmp_path, bad_tiles, four_tiles):
    rows = [(bad_tiles["small_image"], bad_tiles["small_image_label"])]
    rows += [tuple(r[:2]) for r in csv.reader(open(four_tiles))][1:]
    trainer = Trainer(options(tmp_path, write_list(tmp_path / "mixed.csv", rows, ("image_fn", "label_fn")),
                              max_epochs=1))
    assert len(trainer.entries) == 4
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("img_small.tif: tile 16x16 is smaller than a 32 chip; skipped") == 1
    trainer.close()



# ---------------------------------------------------------------------------- recipes


def test_recipe_presets_fill_only_what_is_not_given():
    from dataset.options import parse_options

    published = parse_options(TrainOptions, [])
    assert (published.recipe, published.label_loss, published.entropy_weight, published.augment) == \
        ("published", "hard", 0.0, "none")
    robust = parse_options(TrainOptions, ["--recipe", "robust", "--entropy_weight", "0.3"])
    assert (robust.label_loss, robust.augment, robust.class_balance, robust.refine_labels, robust.refine_seeds,
            robust.refine_jitter, robust.refine_features, robust.focus_chips, robust.guided_filter,
            robust.label_model_weight) == ("focal", "d4", 0.75, "local", 0.1, 0.08, "ndvi", 0.25, 4, 1.0)
    assert (published.refine_labels, published.class_balance, published.refine_seeds, published.refine_jitter,
            published.refine_features, published.focus_chips, published.guided_filter,
            published.label_model_weight) == ("none", 0.0, 0.0, 0.0, "bands", 0.0, 0, 0.0)
    assert robust.entropy_weight == 0.3  # given on the command line: wins over the preset


def test_the_label_model_s_vote_needs_the_label_model():
    from dataset.errors import InputError
    from dataset.options import parse_options

    with pytest.raises(InputError, match="--label_model_weight 1: .* only --refine_labels local fits; "
                                         "--label_model_weight 0 turns it off"):
        parse_options(TrainOptions, ["--recipe", "robust", "--refine_labels", "none"])
    assert parse_options(TrainOptions, ["--recipe", "robust", "--refine_labels", "none",
                                        "--label_model_weight", "0"]).label_model_weight == 0


def test_mix_recipe_trains_with_codes_and_is_resume_exact(tmp_path, four_tiles):
    recipe = dict(label_loss="mix", mix_cell=16, augment="d4", entropy_weight=0.1, class_balance=0.5)
    full = Recording(options(tmp_path / "a", four_tiles, max_epochs=2, **recipe))
    assert full.loss.label_loss == "mix" and full.stream.with_codes
    full.fit()
    first = str(tmp_path / "a" / "run" / "last_0.pth")
    resumed = Recording(options(tmp_path / "b", four_tiles, max_epochs=2, resume=first, **recipe))
    resumed.fit()
    assert resumed.seen == full.seen[4:]  # same chips, orientations and losses after resuming
    payload = read_checkpoint(str(tmp_path / "a" / "run" / "last.pth"))
    assert payload["train_args"]["label_loss"] == "mix" and payload["train_args"]["augment"] == "d4"
    with pytest.raises(Exception, match="--label_loss 'hard' differs"):
        Trainer(options(tmp_path / "c", four_tiles, max_epochs=2, resume=first, **{**recipe, "label_loss": "hard"}))


def test_focal_loss_reaches_the_trainer_and_a_resume_must_repeat_its_gamma(tmp_path, four_tiles):
    trainer = Trainer(options(tmp_path / "a", four_tiles, max_epochs=1, label_loss="focal", focal_gamma=2.0))
    assert (trainer.loss.label_loss, trainer.loss.focal_gamma) == ("focal", 2.0)
    trainer.fit()
    last = str(tmp_path / "a" / "run" / "last.pth")
    assert read_checkpoint(last)["train_args"]["focal_gamma"] == 2.0
    with pytest.raises(Exception, match=r"--focal_gamma 1(\.0)? differs"):
        Trainer(options(tmp_path / "b", four_tiles, max_epochs=2, resume=last, label_loss="focal", focal_gamma=1.0))


@pytest.mark.parametrize("recipe, flag", [({"label_loss": "mix"}, "--label_loss mix"),
                                          ({"refine_labels": "local"}, "--refine_labels local"),
                                          ({"focus_chips": 0.5}, "--focus_chips"),
                                          ({"recipe": "robust"}, "--refine_labels local")])
def test_mix_loss_and_label_refinement_need_the_datasets_mixes(tmp_path, four_tiles, recipe, flag):
    from dataset import load_dataset
    from dataset.errors import InputError

    plain = load_dataset("sample").to_dict()
    del plain["lr_mixes"]
    definition = tmp_path / "plain.json"
    definition.write_text(__import__("json").dumps(plain))
    with pytest.raises(InputError, match=f"{flag}: dataset 'sample' gives no lr_mixes"):
        Trainer(options(tmp_path, four_tiles, dataset=str(definition), **recipe))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("non_vegetated_class"), "names no non_vegetated_class"),
    (lambda d: d.update(bands=["red", "green", "blue", "infrared"]), "has no nir band"),
    (None, "seeds hard LR targets, not --refine_targets mix")])
def test_ndvi_seeds_need_a_non_vegetated_class_and_red_and_nir_bands(tmp_path, four_tiles, change, message):
    from dataset import load_dataset
    from dataset.errors import InputError

    definition = load_dataset("sample").to_dict()
    if change is not None:
        change(definition)
    path = tmp_path / "edited.json"
    path.write_text(__import__("json").dumps(definition))
    recipe = dict(refine_labels="local", refine_seeds=0.1, refine_targets="hard" if change else "mix")
    with pytest.raises(InputError, match=f"--refine_seeds.*{message}.*--refine_seeds 0 turns it off"):
        Trainer(options(tmp_path, four_tiles, dataset=str(path), **recipe))


@pytest.mark.parametrize("recipe, flags, off", [
    (dict(refine_labels="local", refine_features="ndvi"), "--refine_features ndvi",
     "--refine_features bands turns it off"),
    # the preset computes NDVI twice over: one error names both options
    (dict(recipe="robust"), "--refine_seeds and --refine_features ndvi",
     "--refine_seeds 0 --refine_features bands turns them off")])
def test_ndvi_features_need_red_and_nir_bands(tmp_path, four_tiles, recipe, flags, off):
    from dataset import load_dataset
    from dataset.errors import InputError

    definition = load_dataset("sample").to_dict()
    definition["bands"] = ["red", "green", "blue", "infrared"]
    path = tmp_path / "edited.json"
    path.write_text(__import__("json").dumps(definition))
    with pytest.raises(InputError, match=f"^{flags}: dataset 'sample' has no nir band.*{off}$"):
        Trainer(options(tmp_path, four_tiles, dataset=str(path), **recipe))


def test_focus_chips_are_centred_on_developed_codes_and_resume_exactly(tmp_path, four_tiles):
    from dataset.raster_io import open_raster

    full = Recording(options(tmp_path / "a", four_tiles, max_epochs=2, focus_chips=1.0, chips_per_tile=4))
    full.fit()
    entries = read_list(four_tiles)
    labels = []
    for entry in entries:
        with open_raster(entry.label) as src:
            labels.append(src.read(1))
    developed = [np.isin(label, [21, 22]).any() for label in labels]
    assert developed == [True, False, False, True]  # patches 0 and 3 hold NLCD 21 / 22
    chips = [chip for _, step, _ in full.seen for chip in step]
    for tile, row, col in chips:
        window = labels[tile][row:row + 32, col:col + 32]
        assert window.shape == (32, 32)
        if developed[tile]:  # every chip holds a developed pixel, and most are centred on one
            assert np.isin(window, [21, 22]).any()
    centred = [np.isin(labels[t][r + 16, c + 16], [21, 22]) for t, r, c in chips if developed[t]]
    assert len(centred) == 16 and sum(centred) >= 12  # clipped at the tile's edge, a chip is off-centre
    uniform = Recording(options(tmp_path / "u", four_tiles, max_epochs=2, chips_per_tile=4))
    uniform.fit()
    others = lambda seen: [c for _, step, _ in seen for c in step if not developed[c[0]]]  # noqa: E731
    assert others(uniform.seen) == others(full.seen)  # the other tiles' chips are the uniform draws
    first = str(tmp_path / "a" / "run" / "last_0.pth")
    resumed = Recording(options(tmp_path / "b", four_tiles, max_epochs=2, focus_chips=1.0, chips_per_tile=4,
                                resume=first))
    resumed.fit()
    assert resumed.seen == full.seen[len(full.seen) // 2:]
    with pytest.raises(Exception, match="--focus_chips 0.0 differs"):
        Trainer(options(tmp_path / "c", four_tiles, max_epochs=2, chips_per_tile=4, resume=first))


def test_focus_chips_need_a_non_vegetated_class(tmp_path, four_tiles):
    from dataset import load_dataset
    from dataset.errors import InputError

    definition = load_dataset("sample").to_dict()
    del definition["non_vegetated_class"]
    path = tmp_path / "edited.json"
    path.write_text(__import__("json").dumps(definition))
    with pytest.raises(InputError, match="--focus_chips: dataset 'sample' names no non_vegetated_class.*"
                                         "--focus_chips 0 turns it off"):
        Trainer(options(tmp_path, four_tiles, dataset=str(path), focus_chips=0.5))


def test_class_weights_come_from_the_training_labels(four_tiles):
    from dataset import load_dataset
    from training.builders import class_weights

    sample = load_dataset("sample")
    entries = read_list(four_tiles)
    table = sample.mix_table(with_mixes=False)
    counts = np.zeros(5)
    for entry in entries:
        with rasterio.open(entry.label) as src:
            np.add.at(counts, sample.lr_label.map(src.read(1)).ravel(), 1)
    share = counts[1:] / counts[1:].sum()
    weights = class_weights(entries, sample, table, 0.5)
    expected = np.where(share > 0, np.maximum(share, 1e-12) ** -0.5, 0)
    expected /= (share * expected).sum()
    assert weights[0] == 0 and np.allclose(weights[1:], expected, rtol=1e-5)
    assert np.allclose((share * weights[1:]).sum(), 1.0)  # the average labelled pixel weighs 1
    assert np.all(class_weights(entries, sample, table, 0.0)[1:] == (share > 0))


def test_adamw_optimizer_steps_at_the_poly_lr(tmp_path, four_tiles):
    trainer = Recording(options(tmp_path, four_tiles, max_epochs=1, optimizer="adamw", base_lr=0.002))
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    trainer.fit()
    assert [lr for lr, _, _ in trainer.seen] == [poly_lr(0.002, t, trainer.total_steps) for t in range(4)]


class CountingRefiner:
    """Counts the labels a refiner changes."""

    def __init__(self, inner):
        self.inner, self.model, self.changed = inner, inner.model, 0

    def __call__(self, x, codes, label):
        refined = self.inner(x, codes, label)
        self.changed += int((refined != label).sum())
        return refined


@pytest.mark.parametrize("targets, seeds, features", [("hard", 0.0, "bands"), ("mix", 0.0, "bands"),
                                                     ("hard", 0.1, "bands"), ("hard", 0.1, "ndvi")])
def test_label_refinement_trains_on_refined_labels_and_is_resume_exact(tmp_path, four_tiles, monkeypatch, targets,
                                                                       seeds, features):
    from training import builders

    monkeypatch.setattr(builders, "REFINE_CHIPS_PER_TILE", 2)
    monkeypatch.setattr(builders, "REFINE_BAGS", 2)
    recipe = dict(refine_labels="local", refine_targets=targets, refine_seeds=seeds, class_balance=0.5,
                  refine_features=features, label_model_weight=1.0)
    full = Recording(options(tmp_path / "a", four_tiles, max_epochs=2, **recipe))
    assert full.refiner is not None and full.stream.with_codes
    full.refiner = CountingRefiner(full.refiner)
    full.fit()
    assert full.refiner.changed > 0  # some labels were refined (the sample's forest blocks hold lawns)
    first = str(tmp_path / "a" / "run" / "last_0.pth")
    payload = read_checkpoint(first)
    assert payload["train_args"]["refine_labels"] == "local"
    assert {key.split(".")[1] for key in payload["label_model"]} == {"0", "1"}  # two bagged members
    # each band, its mean and its spread; with NDVI, of five bands
    assert payload["label_model"]["members.0.net.0.weight"].shape[1] == (15 if features == "ndvi" else 12)
    resumed = Recording(options(tmp_path / "b", four_tiles, max_epochs=2, resume=first, **recipe))
    for saved, restored in zip(payload["label_model"].values(), resumed.refiner.model.state_dict().values()):
        assert torch.equal(saved, restored)
    resumed.fit()
    assert resumed.seen == full.seen[4:]
    # validation's maps hear the label model as test.py's do: the run's model equals its checkpoint's
    voting = resumed.mapping_model()
    assert isinstance(voting, LabelModelVote) and voting.label_model is resumed.refiner.model
    loaded = model_from_checkpoint(read_checkpoint(str(tmp_path / "b" / "run" / "last.pth")))
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        for ours, theirs in zip(voting.eval()(x), loaded(x)):
            torch.testing.assert_close(ours, theirs)


# ---------------------------------------------------------------------------- runs: extension, snapshots, settings


def test_finished_run_is_extended_with_a_replanned_poly_schedule(tmp_path, four_tiles, capsys):
    Trainer(options(tmp_path, four_tiles, max_epochs=2)).fit()
    last = str(tmp_path / "run" / "last.pth")
    extended = Recording(options(tmp_path, four_tiles, max_epochs=3, resume=last))
    assert (extended.start_epoch, extended.step, extended.total_steps) == (2, 8, 12)
    extended.fit()
    # steps 8..11 follow the poly curve of a 12-step horizon, from the current step on
    assert [lr for lr, _, _ in extended.seen] == [poly_lr(0.01, t, 12) for t in range(8, 12)]
    assert extended.seen[0][0] > poly_lr(0.01, 7, 8)  # not the finished run's near-zero lr
    payload = read_checkpoint(last)
    assert (payload["epoch"], payload["step"], payload["total_steps"]) == (2, 12, 12)
    assert payload["train_args"]["max_epochs"] == 3
    log = (tmp_path / "run" / "train.log").read_text()
    assert "extending the run from 2 to 3 epochs" in log and "new horizon 12 (was 8)" in log
    assert os.path.isfile(tmp_path / "run" / "epoch_2.pth")  # the new last epoch gets its snapshot
    # shortening and any other changed setting stay refused
    argv = ["--dataset", "sample", "--list_dir", four_tiles, "--model_config", "tiny", "--chip_size", "32",
            "--chips_per_tile", "2", "--num_workers", "0", "--out_dir", str(tmp_path / "run"), "--resume", last]
    assert "can be extended, not shortened" in cli_error(capsys, argv + ["--max_epochs", "2"])
    message = cli_error(capsys, argv + ["--max_epochs", "4", "--base_lr", "0.02"])
    assert "--base_lr 0.02 differs" in message


def test_epoch_snapshots_are_model_only_and_map(tmp_path, four_tiles, capsys):
    import test as test_script

    Trainer(options(tmp_path, four_tiles, max_epochs=2)).fit()
    run = tmp_path / "run"
    last, snapshot = read_checkpoint(str(run / "last.pth")), read_checkpoint(str(run / "epoch_1.pth"))
    assert "optimizer" in last and "optimizer" not in snapshot and "rng" not in snapshot
    assert (snapshot["epoch"], snapshot["step"]) == (1, 8)
    for key, value in last["state_dict"].items():
        assert torch.equal(value, snapshot["state_dict"][key]), key
    # SGD momentum is one buffer per parameter: the snapshot is about half the size of last.pth
    assert os.path.getsize(run / "epoch_1.pth") < 0.6 * os.path.getsize(run / "last.pth")
    model = load_model(str(run / "epoch_1.pth"))
    assert model.dataset.name == "sample" and not model.training
    image = read_list(four_tiles)[0].image
    one = write_list(tmp_path / "one.csv", [(image, "", "")])
    code = run_cli(test_script.main, ["--checkpoint", str(run / "epoch_1.pth"), "--list_dir", one, "--out_dir",
                                      str(tmp_path / "maps"), "--chip_size", "32", "--stride", "16", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    from mapping.writer import output_name

    assert os.path.isfile(tmp_path / "maps" / output_name(image))
    message = cli_error(capsys, ["--dataset", "sample", "--list_dir", four_tiles, "--model_config", "tiny",
                                 "--chip_size", "32", "--chips_per_tile", "2", "--max_epochs", "2", "--num_workers",
                                 "0", "--out_dir", str(run), "--resume", str(run / "epoch_1.pth")])
    assert "model-only epoch snapshot: resume from last.pth" in message


def test_run_config_records_every_setting(tmp_path, four_tiles):
    import dataclasses
    import json
    import subprocess

    from dataset import load_dataset

    trainer = Trainer(options(tmp_path, four_tiles, max_epochs=1, CNN_width=16, seed=7))
    trainer.fit()
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert config["options"] == json.loads(json.dumps(dataclasses.asdict(trainer.opts)))
    assert config["options"]["seed"] == 7 and config["options"]["list_dir"] == four_tiles
    assert config["model_config"]["l2hnet"]["width"] == 16 and config["model_config"]["img_size"] == 32
    assert config["dataset"] == load_dataset("sample").to_dict()
    assert config["list"] == four_tiles
    assert config["tiles"] == [os.path.basename(e.image) for e in read_list(four_tiles)]
    assert config["schedule"] == {"start_epoch": 0, "start_step": 0, "steps_per_epoch": 4, "total_steps": 4,
                                  "base_lr": 0.01}
    assert config["versions"]["torch"] == torch.__version__.split("+")[0]
    assert config["versions"]["numpy"] == np.__version__ and config["versions"]["rasterio"] == rasterio.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(train.__file__)),
                          capture_output=True, text=True)
    assert (config["git"] or {}).get("commit") == (head.stdout.strip() if head.returncode == 0 else None)
    # a resumed run keeps the first file and writes its own beside it
    Trainer(options(tmp_path, four_tiles, max_epochs=2, CNN_width=16, seed=7,
                    resume=str(tmp_path / "run" / "last.pth"))).close()
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["options"]["max_epochs"] == 1
    resumed = json.loads((tmp_path / "run" / "run_config_resumed_at_epoch_1.json").read_text())
    assert resumed["options"]["max_epochs"] == 2 and resumed["schedule"]["start_step"] == 4


class LabelRecording(Trainer):
    """Trainer that keeps the (tile, class indices) of every chip it trains on."""

    def train_step(self, batch):
        self.labels = getattr(self, "labels", [])
        self.labels += [(int(chip[0]), label.clone()) for chip, label in zip(batch.chips, batch.label)]
        return super().train_step(batch)


def test_published_layout_trains_without_conversion(tmp_path, capsys):
    """HR_image/ + LR_label_4class/ with the published codes 0-5: code 4 is ignored, a chip with a
    code-0 pixel is skipped, and the raw-NLCD Chesapeake definition would refuse these labels."""
    from dataset import load_dataset
    from dataset.definition import REPO_ROOT
    from dataset.lists import read_dataset_list

    rng = np.random.default_rng(3)
    labels = {"a": rng.choice([1, 2, 3, 5], (64, 64)), "b": np.full((64, 64), 4), "c": np.full((32, 32), 3)}
    labels["c"][16, 16] = 0  # the only chip position of this 32 x 32 tile holds a no-data pixel
    rows = []
    for tile, label in labels.items():
        side = label.shape[0]
        write_geotiff(str(tmp_path / "HR_image" / f"{tile}_naip-new.tif"),
                      rng.integers(1, 255, (4, side, side), dtype=np.uint8))
        write_geotiff(str(tmp_path / "LR_label_4class" / f"{tile}_nlcd.tif_4class.tif"), label.astype(np.uint8))
        rows.append((f"./HR_image/{tile}_naip-new.tif", f"./LR_label_4class/{tile}_nlcd.tif_4class.tif"))
    published = write_list(tmp_path / "published.csv", rows, ("image_fn", "label_fn"))
    trainer = LabelRecording(options(tmp_path, published, dataset="Chesapeake_published", max_epochs=1))
    stats = trainer.fit()["epochs"][0]
    assert stats["skipped_chips"] == 2 and stats["steps"] == 2  # tile c's two chips are skipped
    seen = {tile: torch.stack([label for t, label in trainer.labels if t == index])
            for index, tile in enumerate("abc") if any(t == index for t, _ in trainer.labels)}
    assert sorted(seen) == ["a", "b"]
    assert torch.all(seen["b"] == 0)  # code 4 (barren) is ignored by the loss
    assert set(torch.unique(seen["a"]).tolist()) == {1, 2, 3, 4}  # code 5 is class 4, impervious
    assert load_model(str(tmp_path / "run" / "last.pth")).dataset.name == "Chesapeake_published"
    # the raw-NLCD definition refuses the published codes
    message = cli_error(capsys, ["--dataset", "Chesapeake", "--list_dir", published, "--model_config", "tiny",
                                 "--chip_size", "32", "--max_epochs", "1", "--num_workers", "0", "--out_dir",
                                 str(tmp_path / "raw")])
    assert "are not in the NLCD 2011" in message
    # the shipped list points at the published folders, relative to the repository root
    list_path, entries = read_dataset_list(load_dataset("Chesapeake_published"), check_exists=False)
    assert len(entries) == 100 and list_path.endswith("Chesapeake_NewYork_published.csv")
    folder = os.path.join(REPO_ROOT, "dataset", "Chesapeake_NewYork_dataset")
    assert entries[0].image == os.path.join(folder, "HR_image", "m_4107507_ne_18_1_naip-new.tif")
    assert entries[0].label == os.path.join(folder, "LR_label_4class", "m_4107507_ne_18_1_nlcd.tif_4class.tif")
