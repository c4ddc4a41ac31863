"""Images: where they are (sources), how they decode, the views and augmentations every stage uses, the pre-training
memory cache and its device resampling, how sharp a view is, training batches over processes, labels and folds, and
synthetic phantoms."""
