"""Training from GeoTIFF tiles and LR labels (what train.py runs): options, chips, loss, the loop, checkpoints."""
