"""Pixels: decoding (with the DICOM display pipeline), eligibility, preprocessing, heatmaps."""
