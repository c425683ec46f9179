"""INT8/FP8 calibration from the generator's own sampling runs."""
