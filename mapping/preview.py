"""Quick-look PNGs of a mapped tile: the image beside its labels and the prediction.

Rasters are read decimated (nearest neighbour) straight to the preview size, so a preview of a
large tile needs little memory. Pillow (installed with torchvision) draws and writes the PNGs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from rasterio.enums import Resampling

from dataset.files import atomic_output
from dataset.raster_io import open_raster

TITLE_HEIGHT = 16
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def preview_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """``(h, w)`` with the longer side at most ``max_size`` pixels, aspect kept."""
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _read_small(path: str, what: str, max_size: int, bands: Sequence[int] | None = None) -> np.ndarray:
    with open_raster(path, what) as src:
        h, w = preview_shape(src.height, src.width, max_size)
        indexes = list(bands) if bands else list(range(1, min(src.count, 3) + 1))
        return src.read(indexes=indexes, out_shape=(len(indexes), h, w), resampling=Resampling.nearest)


def stretch_rgb(raw: np.ndarray) -> np.ndarray:
    """``(C, h, w)`` image -> ``(h, w, 3)`` uint8, each band stretched between its 2nd and 98th percentile."""
    bands = [raw[min(i, raw.shape[0] - 1)].astype(np.float64) for i in range(3)]
    out = []
    for band in bands:
        lo, hi = np.percentile(band, (2, 98))
        out.append(np.clip((band - lo) / max(hi - lo, 1e-9) * 255.0, 0, 255))
    return np.stack(out, axis=-1).astype(np.uint8)


def colorize(classes: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """Class indices ``(h, w)`` -> ``(h, w, 3)`` uint8; indices without a colour are drawn magenta."""
    palette = np.full((256, 3), (255, 0, 255), dtype=np.uint8)
    palette[: len(colors)] = np.asarray(colors, dtype=np.uint8)[:, :3]
    return palette[np.clip(classes, 0, 255).astype(np.uint8)]


def eval_colors(dataset) -> list[tuple[int, int, int]]:
    """A colour per evaluation class: that of the first model class mapped to it."""
    if not dataset.prediction_to_eval:
        return list(dataset.class_colors)
    colors = [(0, 0, 0)] * len(dataset.eval_names)
    for model_class in sorted(dataset.prediction_to_eval, reverse=True):
        eval_class = dataset.prediction_to_eval[model_class]
        if 0 <= eval_class < len(colors) and model_class < len(dataset.class_colors):
            colors[eval_class] = dataset.class_colors[model_class]
    return colors


def _panel_row(panels: Sequence[tuple[str, np.ndarray]]) -> Image.Image:
    """Panels side by side, each with its title above."""
    width = sum(p.shape[1] for _, p in panels) + 4 * (len(panels) - 1)
    height = max(p.shape[0] for _, p in panels) + TITLE_HEIGHT
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, pixels in panels:
        draw.text((x + 2, 2), title, fill=TEXT)
        canvas.paste(Image.fromarray(pixels), (x, TITLE_HEIGHT))
        x += pixels.shape[1] + 4
    return canvas


def save_png(image: Image.Image, path: str) -> None:
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")


def write_preview(png_path: str, image_path: str, pred_path: str, dataset, label_path: str | None = None,
                  hr_path: str | None = None, max_size: int = 512) -> str:
    """Write a PNG: image, LR label (if given), prediction, HR reference (if given), side by side.

    Labels go through the dataset's tables (LR -> model classes, HR -> evaluation classes) and
    are drawn with the dataset's colours.

    Raises:
        InputError: a file is missing or unreadable, or a label has codes the tables do not know.
    """
    panels = [("image", stretch_rgb(_read_small(image_path, "image", max_size)))]
    if label_path:
        raw = _read_small(label_path, "label", max_size, bands=[1])[0]
        panels.append(("LR label", colorize(dataset.lr_label.map(raw, label_path), dataset.class_colors)))
    panels.append(("prediction", colorize(_read_small(pred_path, "prediction", max_size, bands=[1])[0],
                                          dataset.class_colors)))
    if hr_path and dataset.hr_label is not None:
        raw = _read_small(hr_path, "reference", max_size, bands=[1])[0]
        panels.append(("HR reference", colorize(dataset.hr_label.map(raw, hr_path), eval_colors(dataset))))
    save_png(_panel_row(panels), png_path)
    return png_path
