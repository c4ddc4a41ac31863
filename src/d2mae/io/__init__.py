"""Artefacts on disk: pre-trained and fine-tuned model folders (safetensors + JSON), OBS tables, weights imported
from MAE/timm checkpoints and encoders exported for timm and Hugging Face."""
