"""Train VCNet on GeoTIFF tiles with low-resolution labels (the published recipe, spec section 6).

Examples::

    python train.py --dataset sample --model_config tiny --chip_size 64 --max_epochs 2   # seconds, CPU
    python train.py --dataset Chesapeake --batch_size 4 --max_epochs 100 --savepath runs/ny --gpu 0
    torchrun --nproc_per_node 4 train.py --dataset Chesapeake --batch_size 4 --savepath runs/ny4
    python train.py --dataset Chesapeake --batch_size 4 --savepath runs/ny --resume runs/ny/last.pth

Checkpoints go to SAVEPATH (epoch_N.pth, last.pth) with train.log and tensorboard/. See
docs/training.md for every flag, timings and multi-node runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tiles.errors import run_cli

CONFIG_CHOICES = ("vcnet", "vcnet_normal", "tiny")  # networks.config.CONFIG_NAMES (not imported: fast --help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="Chesapeake",
                      help="dataset definition: a name in dataset/definitions (Chesapeake, Chesapeake_NLCD16, "
                           "sample, ...) or a JSON file path (default: %(default)s)")
    data.add_argument("--list_dir", default=None,
                      help="CSV list with image_fn,label_fn columns (default: the dataset's list)")
    data.add_argument("--list_root", choices=("csv", "repo"), default=None,
                      help="resolve relative paths of the list against the CSV's folder or the repository root "
                           "(default: 'repo' for lists beside the dataset's default list, else 'csv')")
    data.add_argument("--chip_size", type=int, default=224,
                      help="training chip side in pixels, a multiple of 32 (default: %(default)s)")
    data.add_argument("--chips_per_tile", type=int, default=50,
                      help="random chip positions drawn per tile per epoch (default: %(default)s)")
    data.add_argument("--chip_retries", type=int, default=0,
                      help="extra draws in place of a chip with no-data; 0 skips it as published (default: 0)")
    data.add_argument("--num_workers", type=int, default=None,
                      help="data loader processes per training process (default: 8 as published, at most the "
                           "number of CPUs)")
    data.add_argument("--skip_label_scan", action="store_true",
                      help="do not read every label up front to check its codes (they are still checked "
                           "chip by chip)")

    train = p.add_argument_group("optimisation")
    train.add_argument("--max_epochs", type=int, default=100, help="epochs (default: %(default)s)")
    train.add_argument("--batch_size", type=int, default=2,
                       help="chips per optimiser step per process, at least 2 (default: %(default)s)")
    train.add_argument("--base_lr", type=float, default=0.01,
                       help="SGD learning rate before the poly decay; multiplied by batch/24 when the batch is a "
                            "multiple of 6 other than 24, as published (default: %(default)s)")
    train.add_argument("--seed", type=int, default=1234, help="seed of every random draw (default: %(default)s)")
    train.add_argument("--aux_loss", action="store_true",
                       help="add the auxiliary FCN head and its loss (weight 0.4); off as published")

    model = p.add_argument_group("model")
    model.add_argument("--CNN_width", type=int, default=None,
                       help="L2HNet width: 64 light (published default) or 128 normal (default: the "
                            "--model_config's, 64 for vcnet)")
    model.add_argument("--model_config", choices=CONFIG_CHOICES, default="vcnet",
                       help="model size: vcnet (published), vcnet_normal (width 128), tiny (tests and smoke "
                            "runs) (default: %(default)s)")
    model.add_argument("--pretrained", default=None,
                       help="DeiT-tiny checkpoint (deit_tiny_patch16_224-a1311bcf.pth) for the 12 transformer "
                            "blocks; default: random initialisation")

    run = p.add_argument_group("run")
    run.add_argument("--savepath", default="runs/vcnet",
                     help="folder for checkpoints, train.log and tensorboard/ (default: %(default)s)")
    run.add_argument("--save_interval", type=int, default=20,
                     help="write epoch_N.pth every this many epochs from the first, and after the last; "
                          "last.pth is written every epoch (default: %(default)s)")
    run.add_argument("--resume", default=None,
                     help="continue from a training checkpoint (SAVEPATH/last.pth) with the same settings")
    run.add_argument("--overwrite", action="store_true", help="start afresh in a SAVEPATH that holds a run")
    run.add_argument("--device", default="auto",
                     help="auto (CUDA if available), cpu or cuda (default: %(default)s)")
    run.add_argument("--gpu", type=int, default=0,
                     help="CUDA device index without torchrun; under torchrun LOCAL_RANK decides (default: 0)")
    run.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA (ignored on the CPU)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic algorithms, cuDNN benchmark off (slower; published: off)")
    run.add_argument("--log_interval", type=int, default=10,
                     help="steps between TensorBoard points and progress-bar updates (default: %(default)s)")

    val = p.add_argument_group("validation (optional)")
    val.add_argument("--val_list", default=None,
                     help="CSV with image_fn,hr_label_fn: map these tiles and log OA / mIoU against the HR "
                          "reference every --val_interval epochs and after the last")
    val.add_argument("--val_interval", type=int, default=10, help="epochs between validations (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer import Trainer, TrainOptions  # heavy imports after parsing, so --help is fast

    options = {k: v for k, v in vars(args).items() if not (k == "num_workers" and v is None)}
    Trainer(TrainOptions(**options)).fit()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
