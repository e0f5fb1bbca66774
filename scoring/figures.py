"""The confusion matrix as a PNG, normalised by rows (mIoU.py --confusion_png)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from mapping.preview import BACKGROUND, TEXT, TITLE_HEIGHT, save_png


def write_confusion_png(png_path: str, counts: np.ndarray, row_names: Sequence[str], column_names: Sequence[str],
                        cell: int = 72) -> str:
    """Write the confusion matrix normalised by rows (each row: share of that reference class)."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    label_w, label_h = 110, 40
    rows, cols = shares.shape
    canvas = Image.new("RGB", (label_w + cols * cell, label_h + rows * cell + TITLE_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), "rows: reference, columns: prediction (row-normalised)", fill=TEXT)
    for j, name in enumerate(column_names):
        draw.text((label_w + j * cell + 2, TITLE_HEIGHT + 4), str(name)[:12], fill=TEXT)
    for i, name in enumerate(row_names):
        top = label_h + TITLE_HEIGHT + i * cell
        draw.text((2, top + cell // 2 - 6), str(name)[:18], fill=TEXT)
        for j in range(cols):
            shade = int(255 - 200 * shares[i, j])
            left = label_w + j * cell
            draw.rectangle([left, top, left + cell - 2, top + cell - 2], fill=(shade, shade, 255))
            draw.text((left + 6, top + cell // 2 - 6), f"{100 * shares[i, j]:.1f}%",
                      fill=(255, 255, 255) if shares[i, j] > 0.6 else TEXT)
    save_png(canvas, png_path)
    return png_path
