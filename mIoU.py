"""Score class maps against HR reference land cover: per-class IoU, mIoU, FWIoU, OA, kappa (docs/design.md §8).

Example::

    python mIoU.py --pred_dir predictions/ --list_dir dataset/CSV_list/Chesapeake_NewYork_eval.csv \\
        --json predictions/metrics.json

Each ``hr_label_fn`` of the list is paired with ``PRED_DIR/<name>`` (the name test.py gives the
map of ``image_fn``). Reference codes go through the dataset's HR table (Chesapeake: 1 water,
2 tree canopy, 3 low vegetation, 4/5/6 impervious, 0/15 no data, excluded). One confusion matrix
is summed over all tiles, reading both rasters by windows. The published figures ("OA" = mean
recall, "mIoU" = sum / 4) are reported too, labelled legacy. ``--protocol published`` instead
repeats the published evaluation exactly (the list's last two tiles left out, reference values
0..4 with 0 kept as a class), for a figure to set beside the paper's. The work is done by ``scoring/``
(:func:`scoring.report.run_scoring`). See docs/mapping.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dataset.errors import run_cli
from dataset.options import parse_options
from scoring.options import ScoreOptions


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(ScoreOptions, argv, __doc__)
    from tqdm import tqdm

    from scoring.report import run_scoring

    run_scoring(options, progress=None if options.quiet else lambda items: tqdm(items, desc="tiles", unit="tile"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
