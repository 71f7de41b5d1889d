"""Calibration data: reading texts from files, parquet or `datasets` folders, tokenizing them, and
sampling fixed-length windows with a seeded generator."""
