"""Settings of ``mIoU.py`` (and of the scoring half of ``auto_test.sh``), each declared once."""

from __future__ import annotations

import dataclasses

from dataset.options import TileListOptions, option, override


@dataclasses.dataclass(kw_only=True)
class ScoreOptions(TileListOptions):
    """Score a folder of class maps against the HR references of a list."""

    pred_dir: str = option(required=True, help="folder of class maps written by test.py", group="input")
    dataset: str | None = override(None, none_means="the one test.py stored in the maps")
    json: str | None = option(None, "write all figures to this JSON file", group="output")
    confusion_png: str | None = option(None, "write the row-normalised confusion matrix as a PNG", group="output")
    summary_csv: str | None = option(None, "append one summary row to this CSV (auto_test.sh)", group="output")
    label: str | None = option(None, "first column of the summary row", group="output", none_means="PRED_DIR")
    quiet: bool = option(False, "no table on stdout", group="output")
