"""The options an experiment decides itself, per section, with what to write instead (the equal-budget rule: a
method cannot override the budget, the data or the output folders). Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

#: the labels options of a dataset (datasets.<name>.*), passed to fine-tuning as they are
LABEL_OPTIONS = ("path_column", "label_column", "group_column", "split_column", "fold_column", "image_root",
                 "image_ext", "allow_outside_root", "folds_csv", "classes")

# pre-training options an experiment decides itself, with what to do instead
PRETRAIN_FORBIDDEN = {
    "epochs": "set the pre-training budget under budget: (pretrain_epochs or pretrain_images) — the same for every "
              "method",
    "max_steps": "set the pre-training budget under budget: (pretrain_images) — the same for every method",
    "batch_size": "set budget.pretrain_batch_size — the same for every method",
    "data": "the pre-training images come from datasets.<name>.pretrain_data (or the labeled images)",
    "out": "the experiment chooses the output folders (--out, cache_dir)",
    "preset": "each method has its own preset; choose methods: / ablations: instead",
    "config": "put the options in this file",
    "seed": "list the seeds under seeds:",
    "resume": "use d2mae experiment --resume",
    "device": "set device: at the top level",
}
FINETUNE_FORBIDDEN = {
    "epochs": "set budget.finetune_epochs — the same for every method",
    "batch_size": "set budget.finetune_batch_size — the same for every method",
    "pretrained": "the experiment passes each method's pre-trained model",
    "obs": "each method has its own OBS setting; choose methods: / ablations: instead",
    "search_step": "each method has its own search step; use ablations: [search_step]",
    "obs_table": "the experiment runs OBS itself",
    "mode": "each method has its own mode (supervised = scratch)",
    "method": "the experiment names the methods",
    "seed": "list the seeds under seeds:",
    "out": "the experiment chooses the output folders (--out)",
    "resume": "use d2mae experiment --resume",
    "device": "set device: at the top level",
    "config": "put the options in this file",
    "labels": "set datasets.<name>.labels",
    "protocol": "set datasets.<name>.protocol",
    "folds": "set datasets.<name>.folds",
    "keep_columns": "set datasets.<name>.scanner_column",
    "arch": "set model.arch",
    "img_size": "set model.img_size",
    "in_chans": "set model.in_chans",
    **{k: f"set datasets.<name>.{k}" for k in LABEL_OPTIONS},
}


SEGMENT_FORBIDDEN = {
    **{k: v.replace("finetune", "segment") for k, v in FINETUNE_FORBIDDEN.items()
       if k in ("epochs", "batch_size", "pretrained", "obs", "search_step", "obs_table", "method", "seed", "out",
                "resume", "device", "config", "arch", "img_size", "in_chans", "protocol", "folds", "mode")},
    **{k: f"set datasets.<name>.{k}" for k in ("images", "labels", "masks", "mask_column", "mask_suffix",
                                                "path_column", "image_root", "image_ext", "allow_outside_root",
                                                "group_column", "split_column", "fold_column", "stratify",
                                                "num_classes")},
}
