"""Dataset definitions and CSV tile lists (one place for bands, normalisation and class tables)."""

from dataset.definition import (
    DatasetDefinition,
    LabelTable,
    available_datasets,
    load_dataset,
)
from dataset.lists import TileEntry, read_list

__all__ = [
    "DatasetDefinition",
    "LabelTable",
    "TileEntry",
    "available_datasets",
    "load_dataset",
    "read_list",
]
