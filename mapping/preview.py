"""Quick-look PNGs of a mapped tile: the image beside its labels and the prediction, and a legend.

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
#: Legend layout: a colour swatch, its class name, then the next class; rows wrap at the panels' width.
SWATCH = 12
LEGEND_ROW = 16
LEGEND_GAP = 12


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


def class_legend(entries: Sequence[tuple[str, Sequence[int]]], width: int, title: str = "") -> Image.Image:
    """A legend strip ``width`` pixels wide: ``title`` then, per ``(name, colour)``, a swatch and the name,
    wrapped onto as many rows as needed."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = ([(title, None)] if title else []) + [(name, tuple(color[:3])) for name, color in entries]
    places, x, line = [], 2, 0
    for name, color in items:
        size = (SWATCH + 4 if color is not None else 0) + int(measure.textlength(name)) + LEGEND_GAP
        if x > 2 and x + size > width:
            x, line = 2, line + 1
        places.append((x, line, name, color))
        x += size
    canvas = Image.new("RGB", (width, (line + 1) * LEGEND_ROW + 2), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for x, line, name, color in places:
        y = line * LEGEND_ROW + 2
        if color is not None:
            draw.rectangle((x, y, x + SWATCH - 1, y + SWATCH - 1), fill=color, outline=TEXT)
            x += SWATCH + 4
        draw.text((x, y), name, fill=TEXT)
    return canvas


def _stack(images: Sequence[Image.Image]) -> Image.Image:
    """Images one below the other, left-aligned."""
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), BACKGROUND)
    y = 0
    for image in images:
        canvas.paste(image, (0, y))
        y += image.height
    return canvas


def save_png(image: Image.Image, path: str) -> None:
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")


def write_preview(png_path: str, image_path: str, pred_path: str, dataset, label_path: str | None = None,
                  hr_path: str | None = None, max_size: int = 512) -> str:
    """Write a PNG: image, LR label (if given), prediction, HR reference (if given), side by side,
    and below them the legend: each class's colour and name.

    Labels go through the dataset's tables (LR -> model classes, HR -> evaluation classes) and
    are drawn with the dataset's colours. When the evaluation classes differ from the model's
    (``prediction_to_eval``), the reference panel gets its own legend row.

    Raises:
        InputError: a file is missing or unreadable, or a label has codes the tables do not know.
    """
    panels = [("image", stretch_rgb(_read_small(image_path, "image", max_size)))]
    if label_path:
        raw = _read_small(label_path, "label", max_size, bands=[1])[0]
        panels.append(("LR label", colorize(dataset.lr_label.map(raw, label_path), dataset.class_colors)))
    panels.append(("prediction", colorize(_read_small(pred_path, "prediction", max_size, bands=[1])[0],
                                          dataset.class_colors)))
    reference = bool(hr_path and dataset.hr_label is not None)
    if reference:
        raw = _read_small(hr_path, "reference", max_size, bands=[1])[0]
        panels.append(("HR reference", colorize(dataset.hr_label.map(raw, hr_path), eval_colors(dataset))))
    row = _panel_row(panels)
    legends = [class_legend(list(zip(dataset.class_names, dataset.class_colors)), row.width)]
    if reference and dataset.prediction_to_eval:
        legends.append(class_legend(list(zip(dataset.eval_names, eval_colors(dataset))), row.width,
                                    title="HR reference:"))
    save_png(_stack([row, *legends]), png_path)
    return png_path
