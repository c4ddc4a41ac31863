"""Training: D²MAE pre-training (and the Table 2/3 baselines), blurriness-aware fine-tuning over the evaluation
protocols with its per-fold trainer, their optimisers and schedules, and resuming a stopped run."""
