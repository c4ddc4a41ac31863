"""The D²MAE method, as tensors in and tensors out (no files, no data loaders): the blur schedule and the batched
blur with its sinusoidal embedding (Eq. 1, BLU(t)), the encoder, pre-training model and classifier (Eqs. 2-3,
Algorithm 1 lines 11-12), and the OBS rule (Eqs. 4-5)."""
