"""Shared pytest fixtures: repository paths, the real sample list, tiny configs and checkpoints.

Plain helpers (paths, GeoTIFF and list writers, CLI runners) are in :mod:`tests.helpers`."""

from __future__ import annotations

import os
import sys

import pytest

# The repository root on sys.path, so that tests import the project's packages from any folder.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.helpers import REPO_ROOT, SAMPLE_LIST  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_list():
    return SAMPLE_LIST


@pytest.fixture(scope="session")
def tiny_config():
    from networks.config import get_tiny_config

    return get_tiny_config()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint of a randomly initialised tiny model for the ``sample`` dataset."""
    import torch

    from dataset import load_dataset
    from networks import build_model, save_checkpoint
    from networks.config import get_tiny_config

    torch.manual_seed(0)
    config = get_tiny_config()
    model = build_model(config).eval()
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    save_checkpoint(path, model=model, model_config=config, dataset=load_dataset("sample"))
    return path
