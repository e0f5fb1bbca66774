"""Image-guided filtering of class probabilities (``--guided_filter R``; He, Sun and Tang, ECCV 2010).

A network's probabilities change smoothly across a class boundary, over a few pixels, wherever the
image itself has a sharp edge (a lawn against a tree crown). The guided filter replaces each
probability map, inside every ``(2R + 1)``-square window, by the linear function of the image's bands
that fits it best (least squares, ridge ``GUIDED_EPS``), and averages the windows' fits: where the
image is flat the probabilities are smoothed, where it has an edge they follow the edge. The filter
of probabilities that sum to 1 sums to 1; the few negative values it can give are set to 0 and the
rest renormalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Ridge of the per-window fits, in units of the normalised bands' variance (about 1): the smallest band
#: variation inside a window that counts as an edge. Measured at 0.01 with R = 4 (docs/map_quality.md).
GUIDED_EPS = 0.01


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2r+1)`` square around each pixel (the part of it inside the chip): a mean along the
    rows, then along the columns (the part inside the chip is a rectangle, so the two give the square's
    mean, with 2(2r+1) additions per pixel instead of (2r+1)^2)."""
    side = 2 * radius + 1
    x = F.avg_pool2d(x, (1, side), stride=1, padding=(0, radius), count_include_pad=False)
    return F.avg_pool2d(x, (side, 1), stride=1, padding=(radius, 0), count_include_pad=False)


def guided_filter(guide: torch.Tensor, probs: torch.Tensor, radius: int, eps: float = GUIDED_EPS) -> torch.Tensor:
    """``probs`` filtered with ``guide`` as the guidance image.

    Args:
        guide: ``(B, C, H, W)`` normalised image bands.
        probs: ``(B, K, H, W)`` class probabilities (summing to 1 over ``K``).
        radius: window half-side R in pixels (at least 1).
        eps: ridge of the fits (see :data:`GUIDED_EPS`).

    Returns:
        float32 ``(B, K, H, W)`` probabilities, non-negative, summing to 1 over ``K``.
    """
    guide, probs = guide.float(), probs.float()
    batch, bands, height, width = guide.shape
    classes = probs.shape[1]
    mean_i, mean_p = _box_mean(guide, radius), _box_mean(probs, radius)
    # per pixel: the bands' covariance (C x C, plus the ridge) and their covariance with each class (C x K)
    outer = (guide[:, :, None] * guide[:, None]).flatten(1, 2)
    cov_ii = _box_mean(outer, radius).view(batch, bands, bands, height, width) - mean_i[:, :, None] * mean_i[:, None]
    cov_ii = cov_ii + eps * torch.eye(bands, device=guide.device).view(1, bands, bands, 1, 1)
    cross = (guide[:, :, None] * probs[:, None]).flatten(1, 2)
    cov_ip = _box_mean(cross, radius).view(batch, bands, classes, height, width) - mean_i[:, :, None] * mean_p[:, None]
    slope = torch.linalg.solve(cov_ii.permute(0, 3, 4, 1, 2), cov_ip.permute(0, 3, 4, 1, 2)).permute(0, 3, 4, 1, 2)
    offset = mean_p - (slope * mean_i[:, :, None]).sum(dim=1)
    mean_slope = _box_mean(slope.flatten(1, 2), radius).view(batch, bands, classes, height, width)
    filtered = ((mean_slope * guide[:, :, None]).sum(dim=1) + _box_mean(offset, radius)).clamp_min(0)
    return filtered / filtered.sum(dim=1, keepdim=True).clamp_min(1e-12)
