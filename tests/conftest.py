"""Shared test fixtures: repository paths, real sample data, tiny checkpoints, GeoTIFF writer."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

SAMPLE_DIR = os.path.join(REPO_ROOT, "dataset", "sample")
SAMPLE_LIST = os.path.join(SAMPLE_DIR, "train.csv")
GEOREF_DIR = os.path.join(REPO_ROOT, "tests", "data", "georef")


def write_geotiff(path, array, crs="EPSG:26917", transform=None, nodata=None, **profile):
    """Write ``array`` ((H, W) or (C, H, W)) as a GeoTIFF with a real CRS and transform."""
    import rasterio
    from rasterio.transform import from_origin

    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if transform is None:
        transform = from_origin(500000.0, 4400000.0, 1.0, 1.0)
    meta = dict(driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                dtype=array.dtype, crs=crs, transform=transform, nodata=nodata)
    meta.update(profile)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with rasterio.open(path, "w", **meta) as dst:
        dst.write(array)
    return path


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
