"""The distributed side of a training run: ranks, the process group, and what ranks must agree on.

Without ``torchrun`` every method degenerates to the single-process answer, so the training loop
is written once. Under ``torchrun`` the process group is NCCL on CUDA and gloo on the CPU.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dataset.errors import InputError
from runtime.device import distributed_rank, resolve_device


class DistributedContext:
    """This process among the training processes, on its device.

    Args:
        device, gpu: ``--device`` and ``--gpu``; under torchrun ``LOCAL_RANK`` picks the GPU.
    """

    def __init__(self, device: str, gpu: int) -> None:
        self.rank, self.world_size, local_rank = distributed_rank()
        self.is_main = self.rank == 0
        self.device = resolve_device(device, local_rank if self.world_size > 1 else gpu)
        self._owns_group = False
        self._flags: dist.ProcessGroup | None = None  # host-side group for per-step flags (under NCCL)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def start(self) -> None:
        """Select the CUDA device and create the process group (when torchrun started several)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=60))
            self._owns_group = True
        if self.distributed and dist.get_backend() != "gloo":
            # Per-step flags go through gloo on the host: an NCCL all-reduce read back with .item()
            # makes the host wait for the GPU at every step, so loading stops overlapping compute.
            self._flags = dist.new_group(backend="gloo")

    def close(self) -> None:
        """Destroy the process group if :meth:`start` created it."""
        if self._flags is not None and not self._owns_group and dist.is_initialized():
            dist.destroy_process_group(self._flags)
        self._flags = None
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def my_share(self, items: list) -> list:
        """Every ``world_size``-th item from this rank's index: the ranks' shares are disjoint."""
        return items[self.rank::self.world_size]

    def gather_lists(self, items: list) -> list:
        """The concatenation of every rank's ``items`` (rank order), on every rank."""
        if not self.distributed:
            return items
        gathered: list[list[Any]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(gathered, items)
        return [item for part in gathered for item in part]

    def all_have_batch(self, has_batch: bool, error: str | None) -> bool:
        """True while every rank has a batch; raises on every rank when one met bad input.

        A host tensor on a gloo group: it never waits for the device's queued work."""
        state = -1 if error else int(has_batch)
        if self.distributed:
            flag = torch.tensor([state])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._flags)
            state = int(flag.item())
        if state < 0:
            raise InputError(error or "another rank stopped on bad input (see its error above)")
        return state == 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks (in place; returned)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def share_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), e.g. at the end of an epoch."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel (with SyncBatchNorm on CUDA) when distributed, else ``model``.

        SyncBatchNorm needs CUDA; on the CPU (gloo) BatchNorm statistics stay per rank, and rank 0's
        buffers are broadcast at every forward and at the end of every epoch. On CUDA SyncBatchNorm
        already keeps them equal, so the per-forward broadcast is left out.
        """
        if not self.distributed:
            return model
        cuda = self.device.type == "cuda"
        if cuda:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if cuda else None,
                                                         broadcast_buffers=not cuda)
