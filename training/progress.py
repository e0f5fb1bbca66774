"""Loss and throughput bookkeeping of one epoch: running sums, the logging window, the epoch summary.

The sums stay on the device (no host sync per step); the host reads them every ``--log_interval``
steps and at the end of the epoch, where they are summed over the ranks.
"""

from __future__ import annotations

import math
import time

import torch

from training.losses import LossTerms

LOSS_TERMS = ("loss", "loss_cnn", "loss_vit", "loss_aux")


class EpochMeter:
    """Sums of the loss terms over the epoch and over the current logging window."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=device)
        self.window = torch.zeros_like(self.sums)
        self.steps = self.chips = self.window_steps = self.window_chips = 0
        self.start = self.window_start = time.perf_counter()

    def add(self, terms: LossTerms, chips: int) -> None:
        values = torch.stack([terms.total.detach(), terms.cnn, terms.vit,
                              terms.aux if terms.aux is not None else torch.zeros_like(terms.cnn)]).double()
        self.sums += values
        self.window += values
        self.steps, self.window_steps = self.steps + 1, self.window_steps + 1
        self.chips, self.window_chips = self.chips + chips, self.window_chips + chips

    def window_due(self, interval: int) -> bool:
        """Every ``interval`` steps, and after the first so that slow runs show a loss at once."""
        return self.window_steps == interval or self.steps == 1

    def take_window(self, step: int) -> tuple[dict[str, float], float]:
        """The window's mean loss terms and chips/s (this rank), then a new window.

        Raises:
            FloatingPointError: a loss term is not finite.
        """
        values = (self.window / self.window_steps).tolist()
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"the loss is not finite at step {step} ({values[0]})")
        chips_per_s = self.window_chips / (time.perf_counter() - self.window_start)
        self.window.zero_()
        self.window_steps, self.window_chips, self.window_start = 0, 0, time.perf_counter()
        return dict(zip(LOSS_TERMS, values)), chips_per_s

    def seconds(self) -> float:
        return time.perf_counter() - self.start
