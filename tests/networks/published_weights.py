"""The deterministic published-shape weights behind the parity fixture (tests/data/reference/README.md)."""

from __future__ import annotations

import json
import math
import os
import zlib

import torch

# The fixture ships with the tests, so the parity check runs from any clone.
REFERENCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "reference")
SHAPES_JSON = os.path.join(REFERENCE_DIR, "vcnet_state_dict_shapes.json")
FIXTURE_NPZ = os.path.join(REFERENCE_DIR, "vcnet_parity_fixture.npz")


def rule_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The value the reference rule gives ``key``."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if key.endswith("running_var"):
        return 1.0 + 0.1 * torch.rand(shape, generator=g)
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    if key.endswith(".weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def published_state_dict() -> dict[str, torch.Tensor]:
    """All 1,008 published tensors, made by the rule."""
    with open(SHAPES_JSON, encoding="utf-8") as fh:
        shapes = json.load(fh)["state_dict_shapes"]
    return {key: rule_tensor(key, tuple(shape)) for key, shape in shapes.items()}
