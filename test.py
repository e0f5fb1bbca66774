"""Map GeoTIFF tiles with a VCNet checkpoint: one georeferenced uint8 class map per tile (spec 7).

Example::

    python test.py --checkpoint runs/vcnet/epoch_99.pth --list_dir dataset/CSV_list/Chesapeake_NewYork_eval.csv \\
        --save_path predictions/ --gpu 0

Outputs go to ``SAVE_PATH/<name>``, where ``naip`` in the tile's name becomes ``predictions``
(otherwise ``<stem>_pred.tif``). Existing outputs are kept unless ``--overwrite``, so re-running an
interrupted command resumes it. Under torchrun the ranks share the list. See docs/mapping.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tiles.errors import InputError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "--model_path", dest="checkpoint", required=True,
                   help="project checkpoint (.pth); --model_path is the published name")
    p.add_argument("--dataset", default=None,
                   help="dataset definition (name or JSON); default: the checkpoint's own. Another one must "
                        "have the same band and class counts")
    p.add_argument("--list_dir", default=None,
                   help="CSV list of tiles (column image_fn; label_fn / hr_label_fn are used by --preview); "
                        "default: the dataset's list")
    p.add_argument("--list_root", choices=("csv", "repo"), default=None,
                   help="resolve relative paths in the list against the CSV's folder or the repository root "
                        "(default: 'repo' for lists beside the dataset's default list, else 'csv')")
    p.add_argument("--save_path", default="predictions", help="output folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda (default: %(default)s)")
    p.add_argument("--gpu", type=int, default=0, help="CUDA device index (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=16, help="chips per forward pass (default: %(default)s)")
    p.add_argument("--chip_size", type=int, default=224, help="sliding-window chip (default: %(default)s)")
    p.add_argument("--stride", type=int, default=112, help="sliding-window stride (default: %(default)s)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--num_workers", type=int, default=2,
                   help="image strips read ahead by a background thread (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="re-map tiles whose outputs exist")
    p.add_argument("--save_probs", action="store_true",
                   help="also write <map>_probs.tif: per-class probabilities as uint8 (x 255)")
    p.add_argument("--preview", action="store_true",
                   help="also write <map>_preview.png: image, LR label, prediction, HR reference")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.chip_size <= 0 or args.chip_size % 32:
        raise InputError(f"--chip_size {args.chip_size}: must be a positive multiple of 32")
    if not 0 < args.stride <= args.chip_size:
        raise InputError(f"--stride {args.stride}: must be in 1..{args.chip_size} (the chip size)")
    if args.batch_size <= 0 or args.num_workers < 0:
        raise InputError("--batch_size must be positive and --num_workers not negative")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    # Heavy imports after argument parsing, so --help is fast.
    from tqdm import tqdm

    from dataset import read_list
    from networks import load_model
    from tiles.mapping import (
        MappingPlan,
        check_tiles,
        distributed_rank,
        list_root_for,
        map_list,
        resolve_device,
        select_dataset,
    )

    device = resolve_device(args.device, args.gpu)
    model = load_model(args.checkpoint, device=device)
    dataset = select_dataset(model.dataset, args.dataset)
    list_path = args.list_dir or dataset.default_list()
    if not list_path:
        raise InputError(f"dataset {dataset.name!r} has no default list: give --list_dir")
    entries = read_list(list_path, required=("image_fn",), root=list_root_for(list_path, dataset, args.list_root))
    rank, world, _ = distributed_rank()
    entries = entries[rank::world]
    check_tiles(entries, dataset)
    plan = MappingPlan(entries, args.save_path, save_probs=args.save_probs, preview=args.preview)
    done = map_list(model, plan, dataset=dataset, chip_size=args.chip_size, stride=args.stride,
                    batch_size=args.batch_size, device=device, amp=args.amp, num_workers=args.num_workers,
                    overwrite=args.overwrite, progress=lambda items: tqdm(items, desc="tiles", unit="tile"),
                    log=tqdm.write)
    where = f" (rank {rank} of {world})" if world > 1 else ""
    print(f"{len(done['mapped'])} tiles mapped, {len(done['skipped'])} already done{where}; outputs in "
          f"{args.save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
