"""The image-guided filter of class probabilities (mapping/guided_filter.py, ``--guided_filter``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mapping.guided_filter import guided_filter


def pixel_by_pixel(guide: np.ndarray, probs: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s filter written out window by window: in each (2r+1) square (cut at the image's border),
    the ridge least-squares fit ``p = a . I + b`` of every class; each pixel then averages the fits of the
    windows that hold it, evaluated at its own bands; negatives set to 0 and renormalised."""
    bands, height, width = guide.shape
    classes = probs.shape[0]
    slope = np.zeros((height, width, classes, bands))
    offset = np.zeros((height, width, classes))

    def square(r, c):
        return slice(max(r - radius, 0), r + radius + 1), slice(max(c - radius, 0), c + radius + 1)

    for r in range(height):
        for c in range(width):
            rows, cols = square(r, c)
            x = guide[:, rows, cols].reshape(bands, -1).T.astype(np.float64)
            y = probs[:, rows, cols].reshape(classes, -1).T.astype(np.float64)
            xc, yc = x - x.mean(0), y - y.mean(0)
            a = np.linalg.solve(xc.T @ xc / len(x) + eps * np.eye(bands), xc.T @ yc / len(x))  # (bands, classes)
            slope[r, c], offset[r, c] = a.T, y.mean(0) - x.mean(0) @ a
    out = np.zeros((classes, height, width))
    for r in range(height):
        for c in range(width):
            rows, cols = square(r, c)
            a = slope[rows, cols].reshape(-1, classes, bands).mean(0)
            b = offset[rows, cols].reshape(-1, classes).mean(0)
            out[:, r, c] = a @ guide[:, r, c] + b
    out = np.clip(out, 0, None)
    return out / out.sum(0, keepdims=True)


@pytest.mark.parametrize("radius, eps", [(1, 0.01), (2, 0.1)])
def test_guided_filter_is_the_window_by_window_least_squares_fit(radius, eps):
    rng = np.random.default_rng(3)
    guide = rng.normal(size=(2, 2, 9, 11)).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(2, 3, 9, 11)).astype(np.float32)) * 2, dim=1)
    got = guided_filter(torch.from_numpy(guide), probs, radius, eps).numpy()
    for chip in range(2):
        expected = pixel_by_pixel(guide[chip], probs[chip].numpy(), radius, eps)
        np.testing.assert_allclose(got[chip], expected, rtol=0, atol=2e-5)


def test_guided_filter_gives_distributions():
    generator = torch.Generator().manual_seed(0)
    guide = torch.randn(3, 4, 32, 32, generator=generator)
    probs = torch.softmax(torch.randn(3, 5, 32, 32, generator=generator) * 4, dim=1)
    out = guided_filter(guide, probs, 4)
    assert out.dtype == torch.float32 and out.shape == probs.shape
    assert float(out.min()) >= 0
    torch.testing.assert_close(out.sum(dim=1), torch.ones(3, 32, 32), rtol=0, atol=1e-5)


def test_the_class_boundary_moves_to_the_image_edge():
    """A lawn (dark) against trees (bright), the edge between columns 15 and 16; the network puts the
    boundary two pixels into the lawn (its 'lawn' probability falls through 0.5 at 13.5). Filtered with
    the image as the guide, the map's boundary is the image's, and it is sharp."""
    columns = torch.arange(32, dtype=torch.float32)
    guide = (columns >= 16).float().expand(1, 1, 32, 32) * 3.0
    lawn = torch.sigmoid(13.5 - columns).expand(1, 1, 32, 32)
    probs = torch.cat([lawn, 1 - lawn], dim=1)
    out = guided_filter(guide, probs, 4)[0, 0, 16]
    assert (probs[0, 0, 16] > 0.5).tolist() == (columns < 14).tolist()
    assert (out > 0.5).tolist() == (columns < 16).tolist()
    assert float(out[16:].max()) < 0.05 < 0.5 < float(out[15])


def test_a_flat_image_leaves_a_box_smoothing():
    """Without an edge in the guide the fits are flat: the filter is the mean of the windows' means."""
    probs = torch.softmax(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    out = guided_filter(torch.zeros(1, 4, 16, 16), probs, 2)
    box = torch.nn.functional.avg_pool2d
    expected = box(box(probs, 5, 1, 2, count_include_pad=False), 5, 1, 2, count_include_pad=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
