"""Plant each break of a paper or baseline property into a copy of the package and check that a test catches it.

    python benchmarks/mutations.py            # every break: one line each, CAUGHT or SURVIVED; exit 1 if any survived
    python benchmarks/mutations.py --list     # the breaks and the tests that should catch them
    python benchmarks/mutations.py blu-index  # only these

Each break replaces one exact snippet of ``src/d2mae`` (or, for a test of a benchmark script, of ``benchmarks/``; the
run stops if a snippet is no longer in the code: update the list with the code) in a fresh copy of the repository,
then runs the tests named for it there. A break is CAUGHT when those tests fail. Add a break here for every new
property a test guards (docs/paper-map.md says which test guards which property).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLUR_05 = "__import__('d2mae.method.blur', fromlist=['x']).gaussian_blur"


@dataclass(frozen=True)
class Break:
    name: str
    property: str
    file: str  # under src/d2mae, or a repository path under benchmarks/
    old: str
    new: str
    tests: tuple[str, ...]

    @property
    def path(self) -> str:
        """The planted file, relative to the repository root."""
        return self.file if self.file.startswith("benchmarks/") else f"src/d2mae/{self.file}"


PB = "tests/test_planted_breaks.py"
R = "tests/test_replacing.py::"
BREAKS: tuple[Break, ...] = (
    Break("blu-index", "BLU(t) sits right after CLS (Eq. 2)", "method/models.py",
          "z = torch.cat(head + [tokens], dim=1)", "z = torch.cat(head[::-1] + [tokens], dim=1)",
          ("tests/test_models.py::test_blur_token_sits_after_cls_and_changes_the_output",)),
    Break("sigma-off-by-one", "σ_t = σ_1 + (t − 1)·step (Section 2.2)", "method/blur.py",
          "self.start + (t - 1) * self.step, torch.zeros_like(t)", "self.start + t * self.step, torch.zeros_like(t)",
          ("tests/test_blur.py", "tests/test_models.py::test_encoder_sees_the_image_blurred_at_sigma_t")),
    Break("loss-against-blurred", "the loss is against the original, sharp image (Eq. 3)", "method/models.py",
          "loss = self.loss_per_sample(x, pred, mask if masked_only else None).mean()",
          "loss = self.loss_per_sample(gaussian_blur(x, self.schedule.sigma(t)), pred, "
          "mask if masked_only else None).mean()",
          ("tests/test_models.py::test_loss_target_is_the_unblurred_image",
           "tests/test_models.py::test_pretraining_loss_is_against_the_original_image")),
    Break("obs-argmax", "OBS takes the argmin of the deblurring loss (Eq. 5)", "method/obs.py",
          "np.argmin(arr[:, order], axis=1)", "np.argmax(arr[:, order], axis=1)", ("tests/test_obs.py",)),
    Break("obs-ignores-step", "OBS visits t = 1, 1+s, … (Algorithm 1 line 4)", "method/blur.py",
          "range(1, self.num_levels + 1, search_step)", "range(1, self.num_levels + 1)",
          ("tests/test_obs.py", "tests/test_blur.py")),
    Break("t-fixed-at-1", "t ~ U{1..T} per sample (Section 2.2)", "method/blur.py",
          "t = torch.randint(1, self.num_levels + 1, (batch,), generator=generator)",
          "t = torch.ones(batch, dtype=torch.long)", ("tests/test_blur.py",)),
    Break("blur-after-masking", "the whole image is blurred, then patches are masked (Eq. 1, then 75% masking)",
          "method/models.py",
          "        tokens = self.patch_embed(self.blur(x, t))  # [B, N, D]",
          "        if mask_ratio > 0 and noise is not None:\n"
          "            g, p = self.config.img_size // self.config.patch_size, self.config.patch_size\n"
          "            keep = int(g * g * (1 - mask_ratio))\n"
          "            m = (torch.argsort(torch.argsort(noise, 1), 1) >= keep).float().view(-1, 1, g, g)\n"
          "            x = x * (1 - m.repeat_interleave(p, 2).repeat_interleave(p, 3))\n"
          "        tokens = self.patch_embed(self.blur(x, t))  # [B, N, D]",
          (f"{PB}::test_the_image_is_blurred_whole_before_patches_are_masked",)),
    Break("one-sigma-per-batch", "each sample is blurred at its own σ_t", "method/models.py",
          "gaussian_blur(x, self.schedule.sigma(t), max_sigma=self.schedule.sigmas[-1])",
          "gaussian_blur(x, self.schedule.sigma(t[:1].expand_as(t)), max_sigma=self.schedule.sigmas[-1])",
          ("tests/test_models.py::test_encoder_sees_the_image_blurred_at_sigma_t",
           f"{PB}::test_the_classifier_encoder_sees_the_image_blurred_at_sigma_t_star")),
    Break("moco-no-momentum", "MoCo v3's key encoder follows the query encoder by EMA", "method/moco.py",
          "            self.update_momentum(momentum)\n", "            pass\n",
          (f"{PB}::test_moco_momentum_encoder_follows_the_ema_formula_over_k_loss_steps",)),
    Break("moco-m-zero", "MoCo v3's EMA keeps m of the key encoder", "method/moco.py",
          "pt.mul_(m).add_(po.detach(), alpha=1 - m)", "pt.copy_(po.detach())",
          (f"{PB}::test_moco_momentum_encoder_follows_the_ema_formula_over_k_loss_steps",)),
    Break("moco-no-predictor", "MoCo v3's queries of both views go through the predictor", "method/moco.py",
          "q1 = self.predictor(self.projector(self._features(self.encoder, x1)))",
          "q1 = (self.projector(self._features(self.encoder, x1)))",
          (f"{PB}::test_moco_predictor_gets_gradients_and_shapes_the_loss",)),
    Break("moco-predictor-identity", "MoCo v3 has a predictor MLP on the query side", "method/moco.py",
          "self.predictor = mlp(2, config.moco_dim, config.moco_mlp_dim, config.moco_dim, last_bn=False)",
          "self.predictor = nn.Identity()",
          (f"{PB}::test_moco_predictor_gets_gradients_and_shapes_the_loss",)),
    Break("moco-asymmetric", "MoCo v3's loss is symmetrised over the two views", "method/moco.py",
          "return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)",
          "return 2 * self.contrastive_loss(q1, k2)",
          ("tests/test_table2.py::test_moco_loss_is_symmetric_in_the_two_views",)),
    Break("diffmae-target-xt", "DiffMAE predicts the clean masked patches x₀", "method/diffmae.py",
          "return F.mse_loss(pred.float(), x0), pred, mask", "return F.mse_loss(pred.float(), xt), pred, mask",
          (f"{PB}::test_diffmae_target_is_the_clean_masked_patches",)),
    Break("diffmae-target-eps", "DiffMAE predicts x₀, not the noise ε", "method/diffmae.py",
          "return F.mse_loss(pred.float(), x0), pred, mask", "return F.mse_loss(pred.float(), eps), pred, mask",
          (f"{PB}::test_diffmae_target_is_the_clean_masked_patches",)),
    Break("classifier-blur-at-T", "the classifier sees the image blurred at σ_t* (Algorithm 1 line 11)",
          "method/models.py",
          "        z, _, _ = self.encoder(x, t, 0.0)  # [B, prefix + N, D]",
          "        e = self.encoder\n"
          "        e.blur = lambda x, t, e=e: type(e).blur(e, x, torch.full_like(t, float(e.schedule.num_levels)))\n"
          "        z, _, _ = e(x, t, 0.0)",
          (f"{PB}::test_the_classifier_encoder_sees_the_image_blurred_at_sigma_t_star",)),
    Break("classifier-no-blur", "the classifier sees the image blurred at σ_t* (Algorithm 1 line 11)",
          "method/models.py",
          "        z, _, _ = self.encoder(x, t, 0.0)  # [B, prefix + N, D]",
          "        e = self.encoder\n"
          "        e.blur = lambda x, t, e=e: e.normalize(x.float())\n"
          "        z, _, _ = e(x, t, 0.0)",
          (f"{PB}::test_the_classifier_encoder_sees_the_image_blurred_at_sigma_t_star",)),
    Break("micro-f1", "F1 is the macro average of class-wise F1 (Section 3.1)", "eval/metrics.py",
          'average="macro", zero_division=0))', 'average="micro", zero_division=0))',
          ("tests/test_metrics.py",)),
    Break("weighted-f1", "F1 is the macro average of class-wise F1 (Section 3.1)", "eval/metrics.py",
          'average="macro", zero_division=0))', 'average="weighted", zero_division=0))',
          ("tests/test_metrics.py",)),
    Break("auroc-hard-labels", "AUROC ranks the probabilities, not the predicted labels", "eval/metrics.py",
          "return float(roc_auc_score(y, p[:, 1]))", "return float(roc_auc_score(y, (p[:, 1] > 0.5).astype(float)))",
          ("tests/test_metrics.py",)),
    Break("kernel-not-normalised", "the Gaussian kernel sums to 1 (G_σ of Eq. 1)", "method/blur.py",
          "taps = (taps / taps.sum(dim=1, keepdim=True)).float()", "taps = taps.float()", ("tests/test_blur.py",)),
    Break("kernel-truncated", "the kernel reaches 4σ, as scipy's gaussian_filter", "method/blur.py",
          "own_radius = torch.floor(TRUNCATE * sig + 0.5)", "own_radius = torch.floor(2.0 * sig + 0.5)",
          ("tests/test_blur.py",)),
    Break("cuda-without-bf16", "a CUDA device with bf16 gets bf16 autocast (the GPU path)", "runtime/device.py",
          'amp, why = (bf16, "auto: a CUDA device with bf16") if bf16_supported else',
          'amp, why = (bf16, "auto: a CUDA device with bf16") if bf16_supported and False else',
          ("tests/test_gpu_path.py::test_a_cuda_device_with_bf16_gets_bf16_autocast_fused_adamw_and_sdpa",)),
    Break("attention-not-fused", "attention runs F.scaled_dot_product_attention (the GPU's flash kernels)",
          "method/models.py", "        self.norm = LAYER_NORM(dim) if final_norm else nn.Identity()\n",
          "        self.norm = LAYER_NORM(dim) if final_norm else nn.Identity()\n"
          "        for b in self.blocks:\n            b.attn.fused_attn = False\n",
          ("tests/test_gpu_path.py::test_the_models_attention_and_optimizer_follow_the_plan",)),
    Break("adamw-not-fused", "AdamW runs PyTorch's fused kernel on CUDA and CPU", "runtime/device.py",
          'fused_adamw=device_type in ("cuda", "cpu")', "fused_adamw=False",
          ("tests/test_gpu_path.py::test_the_models_attention_and_optimizer_follow_the_plan",)),
    Break("crop-window-no-mirror", "the CPU's per-window crops are PIL's resize, flips included", "data/resample.py",
          "c = (c.flip(0) if mirror[b] else c).T", "c = c.T",
          ("tests/test_data.py::test_crop_resize_is_pils_bicubic_resize",)),
    Break("blur-memory-path", "pre-training crops are sharp: the memory cache's path", "data/cache.py",
          "return crop_resize(images, sizes, local, self.img_size, flip)",
          f"out = crop_resize(images, sizes, local, self.img_size, flip)\n"
          f"        return {BLUR_05}(out, torch.full((out.shape[0],), 0.5))",
          (f"{PB}::test_sharp_views_of_an_image_at_the_model_size_are_its_pixels",)),
    Break("blur-loader-path", "pre-training crops are sharp: the DataLoader's path", "data/dataset.py",
          "crops.append(torch.from_numpy(resize_box(arr, (j, i, j + w, i + h), s, flip=flip)))",
          "crops.append(torch.from_numpy(__import__('scipy.ndimage', fromlist=['x']).gaussian_filter("
          "resize_box(arr, (j, i, j + w, i + h), s, flip=flip), (0, 0.5, 0.5))))",
          (f"{PB}::test_sharp_views_of_an_image_at_the_model_size_are_its_pixels",)),
    Break("blur-eval-view", "the OBS and fine-tuning views are sharp", "data/dataset.py",
          "return torch.from_numpy(resize_box(arr, center_box(arr.shape[0], arr.shape[1]), s))",
          "return torch.from_numpy(__import__('scipy.ndimage', fromlist=['x']).gaussian_filter("
          "resize_box(arr, center_box(arr.shape[0], arr.shape[1]), s), (0, 0.5, 0.5)))",
          (f"{PB}::test_sharp_views_of_an_image_at_the_model_size_are_its_pixels",)),
    Break("blur-reference-view", "the reference view itself is sharp (every path is measured against it)",
          "data/dataset.py",
          "    return np.clip(out, 0.0, 1.0, out=out)",
          "    out = __import__('scipy.ndimage', fromlist=['x']).gaussian_filter(out, (0, 0.5, 0.5))\n"
          "    return np.clip(out, 0.0, 1.0, out=out)",
          (f"{PB}::test_sharp_views_of_an_image_at_the_model_size_are_its_pixels",)),
    Break("seg-mask-interpolated", "masks are resized by nearest neighbour (values stay classes)", "segment/data.py",
          "Image.Resampling.NEAREST", "Image.Resampling.BILINEAR",
          ("tests/test_segment.py::test_image_and_mask_share_one_crop_and_the_mask_keeps_its_classes",)),
    Break("seg-two-crops", "image and mask share one random crop", "segment/data.py",
          "        y = resize_mask(mask, box, self.img_size, flip=flip)  # [S, S]",
          "        y = resize_mask(mask, random_box(h, w, self.crop_scale) if self.augment else box, self.img_size,"
          " flip=flip)",
          ("tests/test_segment.py::test_image_and_mask_share_one_crop_and_the_mask_keeps_its_classes",)),
    Break("seg-metrics-at-model-size", "segmentation metrics at each image's own size", "segment/predict.py",
          "p = torch.softmax(native_logits(logits[j], hw[j]), dim=0)",
          "p = torch.softmax(logits[j].float(), dim=0)",
          ("tests/test_segment.py::test_segment_end_to_end_on_48_busi_images",)),
    Break("seg-predict-no-obs", "predict runs OBS on new images and feeds their t* to the segmenter",
          "segment/predict.py", "        t_star = new_image_levels(folders[0], first, seg, refs,",
          "        t_star = 0 * new_image_levels(folders[0], first, seg, refs,",
          ("tests/test_segment.py::test_segment_end_to_end_on_48_busi_images",)),
    Break("seg-t-zero", "the segmenter's encoder gets t* (blur at σ_t*, BLU(t*))", "segment/model.py",
          "    z, _, _ = encoder.embed(x, t)  # blurred", "    z, _, _ = encoder.embed(x, torch.zeros_like(t))  #",
          ("tests/test_segment.py::test_the_segmenter_sees_the_image_blurred_at_sigma_t_star_and_t_star_reaches_the"
           "_blur_token",)),
    Break("probe-t-zero", "the probes read the encoder at each image's t*", "train/probe.py",
          "lambda x, levels: clf.features(x, levels).float()", "lambda x, levels: clf.features(x, 0 * levels).float()",
          ("tests/test_probe.py::test_probe_metrics_are_scikit_learn_run_directly_on_the_saved_features",)),
    Break("partial-trains-all", "partial fine-tuning freezes all but the last blocks", "method/models.py",
          "        p.requires_grad = False\n    for block", "        p.requires_grad = True\n    for block",
          ("tests/test_probe.py::test_partial_fine_tuning_trains_only_the_last_blocks",)),
    Break("mde-normal-approx", "the MDE is the paired t-test's (noncentral t), not the normal approximation",
          "eval/statistics.py", "    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-12 * sd))",
          "    return 2.8016 * sd / math.sqrt(n)",
          ("tests/test_report.py::test_minimum_detectable_effect_is_the_gap_a_paired_t_test_detects_with_80_percent"
           "_power",)),
    Break("seg-no-blur", "the segmenter's encoder sees the image blurred at σ_t*", "segment/model.py",
          "    z, _, _ = encoder.embed(x, t)  # blurred",
          "    encoder.blur = lambda x, t, e=encoder: e.normalize(x.float())\n    z, _, _ = encoder.embed(x, t)  #",
          ("tests/test_segment.py::test_the_segmenter_sees_the_image_blurred_at_sigma_t_star_and_t_star_reaches_the"
           "_blur_token",)),
    Break("blur-in-bf16", "the blur stays fp32 under bf16 autocast (the GPU path)", "method/blur.py",
          "    with torch.autocast(x.device.type, enabled=False):\n        x = x.float()\n        sigma = sigma.to",
          "    with torch.autocast(x.device.type, enabled=torch.is_autocast_enabled(x.device.type)):\n"
          "        x = x.float()\n        sigma = sigma.to",
          ("tests/test_blur.py::test_blur_is_fp32_under_autocast",)),
    Break("compiled-another-model", "the compiled step is the eager step compiled (same weights, same loss)",
          "benchmarks/gpu_bench.py", "train_model = torch.compile(model) if",
          "train_model = torch.compile(type(model)(model.config)) if",
          ("tests/test_gpu_path.py::test_the_gpu_script_dry_run_runs_every_pass_and_compiled_matches_eager",)),
    Break("memory-trimmed", "freed tensor memory stays in the process (no page faults a step)", "runtime/memory.py",
          "M_TRIM_THRESHOLD: 2**31 - 1, ", "",
          ("tests/test_memory.py::test_kept_memory_stops_the_page_faults_of_a_repeated_step",)),
    Break("segment-config-copies-a-field", "segmentation adds only its own fields to the shared config",
          "train/config.py", '''    images: str | None = _f(None, "folder of images''',
          "    epochs: int = _f(30, \"most epochs per fold\", TRAIN, min=1)\n"
          "    images: str | None = _f(None, \"folder of images",
          ("tests/test_engine.py::test_no_field_is_declared_in_both_the_segmentation_and_the_classification_config",)),
    Break("old-spelling-silent", "an old option name works and says its new name", "runtime/options.py",
          "            warnings.warn(f\"{old} is now {new}; the old name still works in this release\", FutureWarning,",
          "            (lambda *a, **k: None)(f\"{old} is now {new}; the old name still works in this release\", "
          "FutureWarning,",
          ("tests/test_engine.py::test_one_name_per_concept_and_old_spellings_still_work_with_a_note",)),
    Break("help-lists-everything", "--help lists the common options; --help-all the rest", "commands/flags.py",
          "    hidden = (advanced or f.metadata.get(\"advanced\")) and not SHOW_ALL",
          "    hidden = False",
          ("tests/test_engine.py::test_each_commands_help_fits_on_a_screen_and_help_all_lists_the_rest",)),
    Break("output-beside-inputs", "no output folder holds an input (33.1)", "runtime/outputs.py",
          "        if target in source.parents:\n", "        if False:\n",
          (R + "test_force_never_writes_a_mask_over_an_input_image",)),
    Break("force-over-foreign-files", "--force never replaces a file d2mae did not write (33.1)", "runtime/files.py",
          "    if os.path.realpath(str(path)) in _KEEP:", "    if False:",
          (R + "test_force_writes_beside_ground_truth_masks_but_never_over_one",
           R + "test_force_never_replaces_a_runs_own_test_predictions")),
    Break("force-over-any-csv", "--force replaces only a prediction table d2mae wrote (33.1)", "runtime/outputs.py",
          "        if not first.startswith(header):", "        if False:",
          (R + "test_force_never_replaces_a_csv_d2mae_did_not_write",)),
    Break("hidden-files-ignored", "a folder holding hidden files is not empty (33.8)", "runtime/outputs.py",
          "iterdir() if p.name not in (MARKER, LOCK_NAME)) if folder.is_dir() else []",
          "iterdir() if not p.name.startswith(\".\")) if folder.is_dir() else []",
          (R + "test_a_folder_holding_only_hidden_files_is_not_empty",)),
    Break("masks-by-stem", "masks pair by relative path, not by file stem (33.2)", "segment/masks.py",
          "    return stem if ext.lower() in IMAGE_EXTENSIONS + DICOM_EXTENSIONS else rel",
          "    return (stem if ext.lower() in IMAGE_EXTENSIONS + DICOM_EXTENSIONS else rel).rpartition(\"/\")[2]",
          (R + "test_nested_images_with_one_flat_mask_are_refused",)),
    Break("one-mask-two-images", "two images never share one mask (33.2)", "segment/masks.py",
          "    if shared:\n        raise", "    if False:\n        raise",
          (R + "test_two_images_that_would_share_one_mask_are_refused",)),
    Break("masks-listed-as-images", "files with the mask suffix are never images (33.2)", "segment/masks.py",
          "if mask_stem(Path(r).stem, cfg.mask_suffix) is None]", "]",
          (R + "test_busis_own_layout_masks_beside_images_with_a_suffix",)),
    Break("fractional-mask-cast", "a mask of fractions is an error, not an empty mask (33.3)", "segment/masks.py",
          "    if len(fractional):\n", "    if False:\n",
          (R + "test_a_mask_of_fractions_is_an_error_that_names_the_file",)),
    Break("dice-counts-absent-classes", "Dice counts only classes in the truth or the prediction (33.3)",
          "segment/metrics.py", "if p[0, c].any() or y[0, c].any()]", "]",
          (R + "test_dice_counts_only_the_classes_in_the_truth_or_the_prediction",)),
    Break("segment-resume-retrains", "segment --resume skips finished folds (33.4)", "train/engine.py",
          "finished_fold(fold_dir, self.task.table)", "finished_fold(fold_dir)",
          (R + "test_segment_resume_skips_the_folds_that_finished",)),
    Break("prediction-names-collide", "segment refuses two images that would write one prediction (33.5)",
          "train/tasks.py", "        if len(set(names)) != len(names):", "        if False:",
          (R + "test_segment_refuses_two_images_that_would_write_one_prediction",)),
    Break("probe-replaces-silently", "probe replaces its output only with --force (33.6)", "train/probe.py",
          "cfg.image_ext)], force=cfg.force)", "cfg.image_ext)], resumable=True)",
          (R + "test_probe_replaces_its_earlier_output_only_with_force",)),
    Break("saved-fields-unchecked", "every field read back from a run folder is checked (33.7)",
          "runtime/options.py", "    if not ok or (low is not None and value < low)", "    if False and not ok",
          (R + "test_a_wrong_typed_field_is_one_line_naming_the_file_and_the_key",)),
    Break("per-image-columns-unchecked", "a per-image table without its columns is one line (33.7)",
          "segment/files.py", "    if missing:\n        raise D2maeError(f\"{path} has no column(s)",
          "    if False:\n        raise D2maeError(f\"{path} has no column(s)",
          (R + "test_a_per_image_table_without_its_fold_column_is_one_line",)),
    Break("segment-skip-bad-ignored", "--skip-bad leaves out a corrupt image in segment (33.8)", "segment/masks.py",
          "            if cfg.skip_bad:  #", "            if False:  #",
          (R + "test_skip_bad_leaves_out_a_corrupt_image_in_segment",)),
    Break("keep-steps-beyond-silent", "--keep-steps beyond the last step is one line (33.8)", "train/pretrain.py",
          "        if beyond:\n", "        if False:\n",
          (R + "test_keep_steps_beyond_the_last_step_is_one_line",)),
    Break("knn-k-silent", "a kNN k above the training images is said (33.8)", "train/probe.py",
          "            if name == \"knn\" and cfg.knn_k > len(fold.train):\n                run.say(",
          "            if name == \"knn\" and cfg.knn_k > len(fold.train):\n                (lambda _: None)(",
          (R + "test_knn_k_above_the_training_images_says_so",)),
    Break("label-case-silent", "labels that differ only in case are warned about (33.8)", "data/labels.py",
          "    for spellings in (v for v in alike.values() if len(v) > 1):",
          "    for spellings in (v for v in alike.values() if len(v) > 99):",
          (R + "test_labels_that_differ_only_in_case_are_two_classes_with_a_warning",)),
    Break("pyramid-wrong-blocks", "the pyramid reads blocks at ¼, ½, ¾ and all of the depth (34)", "segment/model.py",
          "        self.taps = skip_blocks(config.depth, 4)  # blocks at",
          "        self.taps = [0, 1, 2, config.depth - 1]  # blocks at",
          ("tests/test_segment.py::test_the_pyramid_reads_the_patch_tokens_of_the_blocks_at_quarter_half_three_"
           "quarters_and_all_of_the_depth",)),
    Break("blur-token-in-decoder", "the decoder reads patch tokens only, the blur token dropped (34)",
          "segment/model.py", "            grids[i] = _grid(z, encoder.num_prefix_tokens)",
          "            grids[i] = _grid(z[:, 1:], 0) if z.shape[1] % 2 else _grid(z, encoder.num_prefix_tokens - 1)",
          ("tests/test_segment.py::test_the_pyramid_reads_the_patch_tokens_of_the_blocks_at_quarter_half_three_"
           "quarters_and_all_of_the_depth",)),
    Break("scratch-row-own-arch", "the scratch row has the pre-trained rows' architecture (34)", "experiment/plan.py",
          "                arch_stage if m.source == \"scratch\" else None)  # the ViT from scratch",
          "                None)  # the ViT from scratch",
          ("tests/test_segment.py::test_the_scratch_row_segments_with_the_pre_trained_rows_architecture",)),
    Break("hd95-own-image-sets", "HD95 is taken over the same lesion images for every row (34)",
          "segment/metrics.py", "np.where(truth, np.where(np.isfinite(hd), hd, diagonal), nan)",
          "np.where(truth, hd, nan)",
          ("tests/test_segment.py::test_hd95_compares_two_runs_on_the_same_lesion_images_with_a_missed_lesion_at_"
           "the_diagonal",)),
    Break("lesion-dice-counts-empty", "lesion-image Dice leaves out empty truths (34)", "segment/metrics.py",
          "        return np.where(truth, values, nan)", "        return values",
          ("tests/test_segment.py::test_lesion_dice_counts_only_the_images_whose_truth_holds_a_lesion",)),
    Break("predict-last-fold", "predict on a run folder averages every fold's probabilities (34)",
          "segment/predict.py", "passes = [(model, mirror) for model in models for",
          "passes = [(model, mirror) for model in models[-1:] for",
          ("tests/test_segment.py::test_predict_with_a_run_folder_averages_every_folds_probabilities",)),
    Break("view-t-star-off-by-one", "the viewer marks t* where the OBS table puts it (36)", "view/assets/viewer.js",
          "  const at = levels.indexOf(t);", "  const at = Math.min(levels.length - 1, levels.indexOf(t) + 1);",
          ("tests/test_view.py::test_an_images_blur_search_marks_t_star_where_the_obs_table_puts_it",)),
    Break("view-grid-drops-last", "the grid shows every image of the run (36)", "view/assets/viewer.js",
          "  for (const it of items) {", "  for (const it of items.slice(0, -1)) {",
          ("tests/test_view.py::test_the_page_opens_from_disk_with_no_error_and_shows_every_image_of_the_run",)),
    Break("view-filter-no-op", "a filter narrows the grid (36)", "view/assets/viewer.js",
          "  return VIEW.items.filter((it) => keyed.every(", "  return VIEW.items.filter((it) => true || keyed.every(",
          ("tests/test_view.py::test_a_filter_narrows_the_grid_to_the_count_the_run_gives",)),
    Break("view-restores-another-level", "the restoration shown at t is the model's at t (36)", "view/images.py",
          "            image, loss = model.restore(x[i:i + rows], t[i:i + rows])",
          "            image, loss = model.restore(x[i:i + rows], t[i:i + rows].flip(0))",
          ("tests/test_view.py::test_the_restoration_shown_at_a_level_is_the_models_own_at_that_level",)),
    Break("cpu-auto-keeps-fp32", "auto takes bf16 on a CPU with bf16 units for a wide encoder (35)",
          "runtime/device.py", "    elif device_type == \"cpu\" and width is not None and width >= BF16_MIN_WIDTH:",
          "    elif device_type == \"cpu\" and width is not None and width >= BF16_MIN_WIDTH and False:",
          ("tests/test_gpu_path.py::test_auto_takes_bf16_on_a_cpu_with_bf16_units_for_an_encoder_wide_enough_and_"
           "says_why",)),
    Break("obs-follows-precision", "the blur search runs in fp32 whatever the precision (35)", "eval/obs.py",
          "workers=workers, precision=\"fp32\", progress=progress, desc=\"OBS\"",
          "workers=workers, precision=\"auto\", progress=progress, desc=\"OBS\"",
          ("tests/test_gpu_path.py::test_the_blur_search_runs_in_fp32_whatever_the_precision",)),
    Break("bf16-limit-in-fp32", "each dtype's step is measured against its own products' limit (35)",
          "benchmarks/roofline.py", "dtype = json.loads(shapes_text), DTYPES.get(dtype_name, torch.float32)",
          "dtype = json.loads(shapes_text), torch.float32",
          ("tests/test_benchmarks.py::test_bf16_limit_is_bf16_products_and_fp32_limit_fp32",)),
    Break("estimate-decodes-validation-every-epoch", "validation views are decoded once per fold (35)",
          "experiment/estimate.py",
          "total += epochs * (n_train * (step + augment) + n_val * infer) + n_val * decode * (1 + truths)",
          "total += epochs * (n_train * (step + augment) + n_val * (infer + decode * (1 + truths)))",
          ("tests/test_experiment.py::test_estimate_decodes_validation_images_once_per_fold_not_per_epoch",)),
    Break("estimate-times-fp32", "the estimate times each step in the precision its stage takes (35)",
          "experiment/estimate.py",
          '    return amp_dtype(device, precision, getattr(model_cfg, "embed_dim", None))',
          "    return None",
          ("tests/test_experiment.py::test_estimate_times_each_step_in_the_precision_its_stage_takes",)),
    Break("cpu-bf16-flash-attention", "CPU bf16 autocast keeps attention off the slow bf16 flash kernel (35)",
          "runtime/device.py", "            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))",
          "            pass",
          ("tests/test_gpu_path.py::test_cpu_bf16_attention_avoids_the_flash_kernel",)),
    Break("memory-not-kept-by-cli", "the command line keeps freed memory before a command runs", "commands/main.py",
          "        keep_freed_memory()  #", "        pass  #",
          ("tests/test_memory.py::test_the_command_line_keeps_freed_memory_before_a_command_runs",)),
)


def _copy_repo(dest: Path) -> None:
    for name in ("src", "tests", "benchmarks", "pyproject.toml"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "gpu_results"))
        else:
            shutil.copy2(src, dest / name)


def run_break(b: Break, workdir: Path) -> tuple[str, float, str]:
    """Apply ``b`` to a fresh copy, run its tests; returns (verdict, seconds, the tests' last line). The verdict is
    CAUGHT when a test failed (pytest's status 1), SURVIVED when all passed, and BROKEN when the tests could not run
    (the planted code does not import, no test was collected, or every test skipped): a plant to mend, not a
    catch."""
    copy = workdir / b.name
    _copy_repo(copy)
    path = copy / b.path
    text = path.read_text(encoding="utf-8")
    if text.count(b.old) != 1:
        raise SystemExit(f"{b.name}: the snippet to replace occurs {text.count(b.old)} times in {b.path} "
                         "(expected once); update benchmarks/mutations.py with the code")
    path.write_text(text.replace(b.old, b.new), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "OMP_NUM_THREADS": "1",
           "D2MAE_SHARED": str(REPO.parent / "shared")}  # the data beside the repository, not beside the copy
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *b.tests],
                          cwd=copy, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    shutil.rmtree(copy, ignore_errors=True)
    verdict = {0: "SURVIVED", 1: "CAUGHT"}.get(proc.returncode, "BROKEN")
    if verdict == "SURVIVED" and lines and " passed" not in lines[-1]:
        verdict = "BROKEN"  # every test skipped (its data not found): nothing was checked
    return verdict, seconds, lines[-1] if lines else proc.stderr.strip()[-200:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="only these breaks (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breaks and their tests, run nothing")
    args = parser.parse_args(argv)
    chosen = [b for b in BREAKS if not args.names or b.name in args.names]
    unknown = set(args.names) - {b.name for b in BREAKS}
    if unknown:
        parser.error(f"unknown break(s) {sorted(unknown)}; see --list")
    if args.list:
        for b in chosen:
            print(f"{b.name:<24} {b.property}\n{'':<24} {b.path}; tests: {', '.join(b.tests)}")
        return 0
    survived = []
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="d2mae-mutations-") as tmp:
        for b in chosen:
            verdict, seconds, last = run_break(b, Path(tmp))
            print(f"{verdict:<9} {b.name:<24} {seconds:5.1f} s  {last[:90]}", flush=True)
            if verdict != "CAUGHT":
                survived.append(f"{b.name} ({verdict})")
    print(f"{len(chosen) - len(survived)} of {len(chosen)} breaks caught in {time.perf_counter() - total:.0f} s"
          + (f"; not caught: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
