"""Tile I/O, chip sampling and sliding-window mapping for large GeoTIFFs."""
