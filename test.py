"""Map GeoTIFF tiles with a VCNet checkpoint: one georeferenced uint8 class map per tile (docs/design.md §7).

Example::

    python test.py --checkpoint runs/vcnet/epoch_99.pth --list_dir dataset/CSV_list/Chesapeake_NewYork_eval.csv \\
        --out_dir predictions/ --gpu 0

Outputs go to ``OUT_DIR/<name>``, where ``naip`` in the tile's name becomes ``predictions``
(otherwise ``<stem>_pred.tif``). Existing outputs are kept unless ``--overwrite``, so re-running an
interrupted command resumes it. Under torchrun the ranks share the list; ``--shard K/N`` maps one
shard of it (a Slurm job array: ``--shard $SLURM_ARRAY_TASK_ID/N``). The work is done by
``mapping/`` (:func:`mapping.run.run_mapping`). See docs/mapping.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dataset.errors import run_cli
from dataset.options import parse_options
from mapping.options import MapOptions


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(MapOptions, argv, __doc__)
    # Heavy imports after argument parsing, so --help is fast.
    from tqdm import tqdm

    from mapping.run import run_mapping
    from runtime.device import distributed_rank

    done = run_mapping(options, progress=lambda items: tqdm(items, desc="tiles", unit="tile"), log=tqdm.write)
    rank, world, _ = distributed_rank()
    index, count = options.shard_index
    parts = ([f"shard {index}/{count}"] if count > 1 else []) + ([f"rank {rank} of {world}"] if world > 1 else [])
    where = f" ({', '.join(parts)})" if parts else ""
    print(f"{len(done['mapped'])} tiles mapped, {len(done['skipped'])} already done{where}; outputs in "
          f"{options.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
