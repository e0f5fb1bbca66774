"""Settings of ``test.py`` (and of the mapping half of ``auto_test.sh``), each declared once."""

from __future__ import annotations

import dataclasses

from dataset.errors import InputError
from dataset.options import Options, TileListOptions, at_least, multiple_of, option, override
from mapping.nodata import AUTO, check_image_nodata
from mapping.overviews import OVERVIEW_MIN_SIZE
from networks.config import SIZE_MULTIPLE
from runtime.device import DeviceOptions


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``.

    Raises:
        InputError: naming ``--shard`` and what is wrong.
    """
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"--shard {text}: give K/N, shard K (counted from 0) of N, e.g. 0/10")
    index, count = int(parts[0]), int(parts[1])
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: K must be in 0..N-1 (counted from 0, like SLURM_ARRAY_TASK_ID "
                         f"with --array=0-{max(count - 1, 0)})")
    return index, count


@dataclasses.dataclass(kw_only=True)
class SlidingWindowOptions(Options):
    """The sliding window of the published mapping procedure (docs/design.md §7)."""

    chip_size: int = option(224, "sliding-window chip side in pixels, a multiple of 32", group="sliding window",
                            check=multiple_of(SIZE_MULTIPLE))
    stride: int = option(112, "sliding-window stride, at most the chip size", group="sliding window",
                         check=at_least(1))
    batch_size: int = option(16, "chips per forward pass", group="sliding window", check=at_least(1))
    num_workers: int = option(2, "image strips read ahead by a background thread (0: no background threads; "
                                 "above 0 the chips are also computed in a second one)", group="sliding window",
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
    overview_min_size: int = option(OVERVIEW_MIN_SIZE, "maps whose longer side has at least this many pixels get "
                                                       "internal overviews (mode resampling); 0: none",
                                    group="output", check=at_least(0))
    guided_filter: int | None = option(None, "radius R of the image-guided filter of each chip's class probabilities "
                                             "(they then follow the image's edges; docs/mapping.md); 0 is off",
                                       group="sliding window", check=at_least(0),
                                       none_means="the checkpoint's recipe's: 4 for --recipe robust, else 0")
    label_model_weight: float | None = option(None, "weight of the run's label-refinement classifiers' "
                                                    "log-probabilities added to the network's logits (docs/mapping.md); "
                                                    "0 maps with the network alone; above 0 needs a checkpoint trained "
                                                    "with --refine_labels local", group="sliding window",
                                              check=at_least(0),
                                              none_means="the checkpoint's recipe's: 1 for --recipe robust, else 0")
    image_nodata: str = option(AUTO, "image pixels whose every band holds this value are no data: the map writes 0 "
                                     "(its nodata) there. auto: the tile's declared nodata value (none declared: every "
                                     "pixel is mapped); a number: that value; none: map every pixel, as published "
                                     "(docs/mapping.md)", metavar="{auto,none,VALUE}", group="data",
                               check=check_image_nodata)
    shard: str | None = option(None, "map only shard K of N (K counted from 0): every N-th tile of the list from "
                                     "the K-th, e.g. --shard $SLURM_ARRAY_TASK_ID/100; under torchrun the ranks "
                                     "split the shard", metavar="K/N", group="data", none_means="the whole list")

    def check(self) -> None:
        super().check()
        if self.shard is not None:
            parse_shard(self.shard)

    @property
    def shard_index(self) -> tuple[int, int]:
        """``(K, N)`` of ``--shard``; ``(0, 1)`` without it."""
        return parse_shard(self.shard) if self.shard is not None else (0, 1)


@dataclasses.dataclass(kw_only=True)
class MosaicOptions(Options):
    """Write a VRT mosaic of a folder of maps, so that the whole region opens as one layer."""

    pred_dir: str = option(required=True, help="folder of maps written by test.py (every shard's)", group="data")
    crs: str | None = option(None, "mosaic only the maps in this CRS (e.g. EPSG:26918); needed when the maps are in "
                                   "several", group="data", none_means="the maps' CRS")
    out: str | None = option(None, "the VRT file to write", group="output", none_means="PRED_DIR/mosaic.vrt")
