"""Inference and evaluation: the one sharded inference loop, OBS over a data set, prediction on new images, metrics
with confidence intervals and tests, run evaluation and comparison, and the tables, figures and report documents."""
