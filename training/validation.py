"""Validation during training: map the ``--val_list`` tiles with the current weights and score them
against their HR references, exactly as ``test.py`` and ``mIoU.py`` would (chip, stride chip/2)."""

from __future__ import annotations

import os

import numpy as np
import torch

from dataset import DatasetDefinition, TileEntry
from mapping.writer import map_tile, output_name
from scoring.metrics import compute_metrics, confusion_for_pair
from training.distributed import DistributedContext


def validate(model: torch.nn.Module, entries: list[TileEntry], dataset: DatasetDefinition, *, chip_size: int,
             folder: str, ctx: DistributedContext, amp: bool = False, guided_filter: int = 0
             ) -> dict[str, float | None]:
    """Overall accuracy and mIoU of the confusion matrix summed over ``entries`` (shared out over ranks).

    The maps are written to ``folder`` (replaced at every validation), with the run's ``--guided_filter``.
    """
    module = getattr(model, "module", model)
    names = dataset.eval_names
    cm = np.zeros((len(names) - 1, len(names)), dtype=np.int64)
    for entry in ctx.my_share(entries):
        out = os.path.join(folder, output_name(entry.image))
        map_tile(module, entry.image, out, dataset=dataset, chip_size=chip_size, stride=chip_size // 2,
                 device=ctx.device, amp=amp, overwrite=True, guided_filter=guided_filter)
        cm += confusion_for_pair(out, entry.hr_label, dataset)
    cm = ctx.sum(torch.from_numpy(cm).to(ctx.device)).cpu().numpy()
    metrics = compute_metrics(cm, names)
    return {"val_overall_accuracy": metrics["overall_accuracy"], "val_mean_iou": metrics["mean_iou"]}
