"""The device a command runs on, and the rank it has under ``torchrun``.

Both training and mapping take ``--device``, ``--gpu`` and ``--amp`` (:class:`DeviceOptions`) and
read the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) the same way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from dataset.errors import InputError
from dataset.options import Options, at_least, option

if TYPE_CHECKING:  # torch is imported when a device is resolved, so that --help stays fast
    import torch


@dataclasses.dataclass
class DeviceOptions(Options):
    """Where a command computes: shared by train.py and test.py."""

    device: str = option("auto", "auto (CUDA if available), cpu, cuda or cuda:N", group="device")
    gpu: int = option(0, "CUDA device index without torchrun; under torchrun LOCAL_RANK decides",
                      group="device", check=at_least(0))
    amp: bool = option(False, "bfloat16 autocast on CUDA (ignored on the CPU)", group="device")


def distributed_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (0, 1, 0 without it)."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def resolve_device(device: str = "auto", gpu: int = 0) -> torch.device:
    """The torch device to compute on.

    Args:
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        gpu: CUDA device index when ``device`` gives none; under torchrun with several ranks
            ``LOCAL_RANK`` is used instead.

    Raises:
        InputError: another device type (meta, ...), CUDA requested but not available, or an index
            that does not exist.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device}: not a device name (use auto, cpu, cuda or cuda:N)") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise InputError(f"--device {device}: not a device this project computes on (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    _, world, local_rank = distributed_rank()
    if world > 1:
        index, flag = local_rank, f"LOCAL_RANK {local_rank}"
    elif parsed.index is not None:
        index, flag = parsed.index, f"--device {device}"
    else:
        index, flag = gpu, f"--gpu {gpu}"
    if not 0 <= index < torch.cuda.device_count():
        raise InputError(f"{flag}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def prepare_device(device: torch.device, benchmark: bool = True) -> None:
    """Make a CUDA ``device`` the current one and let cuDNN pick its fastest kernels; no-op on the CPU.

    Under torchrun each rank then allocates on its own GPU (``LOCAL_RANK``) even where a library
    uses the current device, and cuDNN benchmarks once per input shape, which pays with fixed-size
    chips. ``benchmark=False`` keeps cuDNN's deterministic choice.
    """
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = benchmark
