"""d2mae — D²MAE (Diffusional Deblurring Masked Autoencoder, MICCAI 2025) for ultrasound images.

Pre-training with a per-sample blur schedule and a blur token, optimal blurriness search (OBS), blurriness-aware
fine-tuning, evaluation and prediction. See the README for the command line and the Python API.
"""

from d2mae.blur import BlurSchedule, gaussian_blur
from d2mae.errors import D2maeError
from d2mae.models import DeblurEncoder, DeblurMAE, ModelConfig

__version__ = "0.1.0"

__all__ = ["BlurSchedule", "D2maeError", "DeblurEncoder", "DeblurMAE", "ModelConfig", "gaussian_blur", "__version__"]
