"""The ground floor every other package stands on: what a dataset is and how its files are read.

Dataset definitions (bands, normalisation, class tables), CSV tile lists, raster I/O, up-front tile
checks, atomic outputs, the one-line user errors, and the command-line option declarations that
several commands share. Nothing here imports another package of the project.
"""

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
