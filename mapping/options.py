"""Settings of ``test.py`` (and of the mapping half of ``auto_test.sh``), each declared once."""

from __future__ import annotations

import dataclasses

from dataset.errors import InputError
from dataset.options import Options, TileListOptions, at_least, multiple_of, option, override
from networks.config import SIZE_MULTIPLE
from runtime.device import DeviceOptions


@dataclasses.dataclass(kw_only=True)
class SlidingWindowOptions(Options):
    """The sliding window of the published mapping procedure (spec section 7)."""

    chip_size: int = option(224, "sliding-window chip side in pixels, a multiple of 32", group="sliding window",
                            check=multiple_of(SIZE_MULTIPLE))
    stride: int = option(112, "sliding-window stride, at most the chip size", group="sliding window",
                         check=at_least(1))
    batch_size: int = option(16, "chips per forward pass", group="sliding window", check=at_least(1))
    num_workers: int = option(2, "image strips read ahead by a background thread", group="sliding window",
                              check=at_least(0))

    def check(self) -> None:
        super().check()
        if self.stride > self.chip_size:
            raise InputError(f"--stride {self.stride}: must be in 1..{self.chip_size} (the chip size)")


@dataclasses.dataclass(kw_only=True)
class MapOptions(DeviceOptions, TileListOptions, SlidingWindowOptions):
    """Map the tiles of a list with one checkpoint."""

    checkpoint: str = option(required=True, aliases=("--model_path",), group="model",
                             help="project checkpoint (.pth); --model_path is the published name")
    dataset: str | None = override(None, none_means="the checkpoint's own; another one must have the same band "
                                                    "and class counts")
    out_dir: str = option("predictions", "output folder for the class maps", aliases=("--save_path",),
                          group="output")
    overwrite: bool = option(False, "re-map tiles whose outputs exist (default: keep them, so a rerun resumes)",
                             group="output")
    save_probs: bool = option(False, "also write <map>_probs.tif: per-class probabilities as uint8 (x 255)",
                              group="output")
    preview: bool = option(False, "also write <map>_preview.png: image, LR label, prediction, HR reference",
                           group="output")
