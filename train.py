"""Train VCNet on GeoTIFF tiles with low-resolution labels (the published recipe, docs/design.md §6).

Examples::

    python train.py --dataset sample --model_config tiny --chip_size 64 --max_epochs 2   # seconds, CPU
    python train.py --dataset Chesapeake --batch_size 4 --max_epochs 100 --out_dir runs/ny --gpu 0
    torchrun --nproc_per_node 4 train.py --dataset Chesapeake --batch_size 4 --out_dir runs/ny4
    python train.py --dataset Chesapeake --batch_size 4 --out_dir runs/ny --resume runs/ny/last.pth
    python train.py --dataset Chesapeake --batch_size 4 --out_dir runs/ny --resume runs/ny/last.pth --max_epochs 150

Checkpoints go to OUT_DIR (last.pth for resume, model-only epoch_N.pth snapshots) with
run_config.json, train.log and tensorboard/. The work is done
by ``training/`` (:class:`training.trainer.Trainer`). See docs/training.md for every flag, timings
and multi-node runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dataset.errors import run_cli
from dataset.options import parse_options
from training.options import TrainOptions


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(TrainOptions, argv, __doc__)
    from training.trainer import Trainer  # heavy imports after parsing, so --help is fast

    Trainer(options).fit()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
