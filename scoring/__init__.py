"""Scoring class maps against HR reference land cover (what mIoU.py runs): confusion matrix, metrics, report."""
