"""Distributed training: two CPU processes (gloo) see different chips and end with the same weights."""

from __future__ import annotations

import glob
import os
import socket

import torch
import torch.multiprocessing as mp

from tests.helpers import SAMPLE_LIST

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from training.options import TrainOptions
    from training.trainer import Trainer

    class Recording(Trainer):
        def train_step(self, batch):
            self.chips = getattr(self, "chips", []) + [tuple(c) for c in batch.chips.tolist()]
            return super().train_step(batch)

    trainer = Recording(TrainOptions(dataset="sample", list_dir=SAMPLE_LIST, model_config="tiny", chip_size=32,
                                     chips_per_tile=2, batch_size=2, max_epochs=2, num_workers=1, device="cpu",
                                     out_dir=out_dir, log_interval=1))
    summary = trainer.fit()
    torch.save({"chips": trainer.chips, "state": trainer.model.module.state_dict(), "summary": summary,
                "steps": trainer.step}, os.path.join(out, f"rank{rank}.pt"))


def test_two_ranks_share_the_tiles_and_agree_on_the_weights(tmp_path):
    out_dir = str(tmp_path / "run")
    mp.spawn(_rank_main, args=(_free_port(), out_dir, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # 8 tiles x 2 chips x 2 epochs, shared out: each rank 4 tiles per epoch, 4 steps of 2 chips.
    assert ranks[0]["steps"] == ranks[1]["steps"] == 8
    chips = [set(r["chips"]) for r in ranks]
    assert len(chips[0]) == len(chips[1]) == 16 and not chips[0] & chips[1]
    for epoch in range(2):  # within an epoch the ranks read disjoint tiles that cover the list
        tiles = [{c[0] for c in r["chips"][epoch * 8:(epoch + 1) * 8]} for r in ranks]
        assert len(tiles[0]) == len(tiles[1]) == 4 and tiles[0] | tiles[1] == set(range(8))
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    saved = torch.load(os.path.join(out_dir, "last.pth"), weights_only=True)["state_dict"]
    for key, value in saved.items():
        assert torch.equal(value, ranks[0]["state"][key]), key
    assert sorted(glob.glob("*", root_dir=out_dir)) == ["epoch_0.pth", "epoch_1.pth", "last.pth", "run_config.json",
                                                        "tensorboard", "train.log"]


def _two_rank_context(monkeypatch, device: str):
    """Rank 0 of 2 whose device claims to be ``device`` (nothing is allocated there)."""
    from training.distributed import DistributedContext

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ctx = DistributedContext("cpu", 0)
    ctx.device = torch.device(device)
    return ctx


def test_per_step_flag_is_a_host_tensor_even_on_cuda(monkeypatch):
    """A CUDA flag read back with .item() would make the host wait for the GPU at every step."""
    import torch.distributed as dist

    ctx = _two_rank_context(monkeypatch, "cuda:0")
    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, group=None: reduced.append(tensor.device))
    assert ctx.all_have_batch(True, None)
    assert reduced == [torch.device("cpu")]


def test_ddp_leaves_out_the_buffer_broadcast_only_with_sync_batchnorm(monkeypatch):
    captured = {}

    def fake_ddp(model, **kwargs):
        captured["kwargs"], captured["model"] = kwargs, model
        return model

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", fake_ddp)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    _two_rank_context(monkeypatch, "cuda:0").wrap(net)
    assert captured["kwargs"] == {"device_ids": [0], "broadcast_buffers": False}
    assert isinstance(captured["model"][1], torch.nn.SyncBatchNorm)
    _two_rank_context(monkeypatch, "cpu").wrap(net)
    assert captured["kwargs"] == {"device_ids": None, "broadcast_buffers": True}


def _weights_rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    import training.builders as builders
    from dataset import load_dataset, read_list
    from training.distributed import DistributedContext

    opened = []
    real_open = builders.open_raster
    builders.open_raster = lambda path, what: opened.append(os.path.basename(path)) or real_open(path, what)
    ctx = DistributedContext("cpu", 0)
    ctx.start()
    try:
        sample = load_dataset("sample")
        entries = read_list(SAMPLE_LIST)
        weights = builders.class_weights(entries, sample, sample.mix_table(with_mixes=True), 0.75, ctx)
    finally:
        ctx.close()
    torch.save({"weights": weights, "opened": opened}, os.path.join(out, f"weights{rank}.pt"))


def test_ranks_share_the_class_weight_reading_and_agree_with_one_process(tmp_path):
    from dataset import load_dataset, read_list
    from training.builders import class_weights

    mp.spawn(_weights_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"weights{r}.pt", weights_only=False) for r in range(WORLD)]
    sample = load_dataset("sample")
    entries = read_list(SAMPLE_LIST)
    alone = class_weights(entries, sample, sample.mix_table(with_mixes=True), 0.75)
    labels = sorted(os.path.basename(e.label) for e in entries)
    assert len(ranks[0]["opened"]) == len(ranks[1]["opened"]) == len(labels) // 2
    assert sorted(ranks[0]["opened"] + ranks[1]["opened"]) == labels  # each label read once, by one rank
    for rank in ranks:
        assert rank["weights"].tobytes() == alone.tobytes()
