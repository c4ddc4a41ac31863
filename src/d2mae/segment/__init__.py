"""Lesion segmentation from any pre-trained encoder, blurriness-aware (beyond the paper; docs/segment.md)."""
