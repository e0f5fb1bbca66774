"""Preparing a new area for training (behind tools/prepare_data.py): align LR labels, lists, statistics, checks."""
