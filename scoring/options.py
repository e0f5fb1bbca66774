"""Settings of ``mIoU.py`` (and of the scoring half of ``auto_test.sh``), each declared once."""

from __future__ import annotations

import dataclasses

from dataset.errors import InputError
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
    protocol: str = option("corrected", "corrected: every listed tile, reference no-data excluded, true OA and mIoU "
                                        "over the real classes (published figures also given, labelled legacy); "
                                        "published: the published evaluation exactly, to set a figure beside the "
                                        "paper's: the list's last two tiles left out, reference values 0..4 with 0 "
                                        "kept as a class, 'OA' = mean recall, 'mIoU' = sum of IoU / 4",
                           choices=("corrected", "published"), group="evaluation")
    published_reference: str = option("as_stored", "with --protocol published: as_stored reads reference values as "
                                                    "they are (the published script expects them mapped to 0..4 "
                                                    "already); hr_table maps raw codes through the dataset's HR table "
                                                    "first (CCLC 4, 5, 6 -> 4; 0, 15 -> 0)",
                                      choices=("as_stored", "hr_table"), group="evaluation")

    def check(self) -> None:
        super().check()
        if self.protocol == "published" and (self.summary_csv or self.confusion_png):
            raise InputError("--protocol published: writes the table and --json only (no --summary_csv or "
                             "--confusion_png)")
