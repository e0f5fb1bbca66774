"""Mapping tiles of any size with a checkpoint (what test.py runs): sliding window, GeoTIFF writer, previews."""
