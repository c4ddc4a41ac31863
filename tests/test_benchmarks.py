"""Quick checks of the benchmark scripts: the reference MAE is the same model as DeblurMAE, and the GPU benchmark
runs end to end on the CPU with a tiny model (seconds)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from d2mae.data.phantom import generate_phantoms
from d2mae.method.blur import gaussian_blur
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurMAE

from .conftest import TINY

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import allocator_speed  # noqa: E402
import bf16_speed  # noqa: E402
import crop_speed  # noqa: E402
import demo_time  # noqa: E402
import fair_reference  # noqa: E402
import gpu_bench  # noqa: E402
import reference_mae  # noqa: E402
import roofline  # noqa: E402


def test_reference_model_equals_deblur_mae() -> None:
    """Same weights, images, levels and mask: the reference (unfused attention, blur outside) gives DeblurMAE's loss."""
    cfg = ModelConfig(**TINY, mean=[0.4], std=[0.2])
    model = DeblurMAE(cfg).eval()
    ref = reference_mae.ReferenceDeblurMAE(reference_mae.ReferenceConfig.from_d2mae(cfg)).eval()
    reference_mae.load_from_d2mae(ref, model.state_dict())
    assert all(not b.attn.fused_attn for b in [*ref.blocks, *ref.decoder_blocks])
    trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in model.parameters())
    x = torch.rand(3, 1, cfg.img_size, cfg.img_size)  # [B, C, S, S] in [0, 1]
    t = torch.tensor([1.0, 5.0, 11.0])
    noise = torch.rand(3, cfg.num_patches)
    with torch.no_grad():
        loss, _, _ = model(x, t, noise=noise)
        xb = model.encoder.normalize(gaussian_blur(x, cfg.schedule.sigma(t)))
        loss_ref, _, _ = ref(xb, model.encoder.normalize(x), t, mask_ratio=cfg.mask_ratio, noise=noise)
    assert torch.allclose(loss, loss_ref, rtol=1e-5, atol=1e-6)


def test_reference_dataset_item(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray((torch.rand(40, 50) * 255).byte().numpy()).save(path)
    ds = reference_mae.BlurDataset([str(path)], 32, [0.1, 0.2, 0.3], [0.5], [0.25])
    blurred, original, t = ds[0]
    assert blurred.shape == original.shape == (1, 32, 32)
    assert 1 <= t <= 3


def test_gpu_bench_runs_on_cpu_tiny(tmp_path: Path) -> None:
    path = gpu_bench.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)])
    text = path.read_text()
    assert "| vit_tiny_patch16 (tiny test) | 32 | 8 | bf16 | eager |" in text
    assert "OBS" in text and "thyroid" in text
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    row = data["rows"][0]
    assert row["images_per_s"] > 0 and row["gflop_per_step"] > 0
    assert data["obs"]["levels"] == 6


def test_roofline_profiles_a_step_and_times_its_products_alone() -> None:
    (r,) = roofline.main(["--img-size", "32", "--decoder-embed-dim", "32", "--decoder-depth", "1",
                          "--decoder-num-heads", "2", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                          "--repeats", "1", "--threads", "1", "--n-images", "8", "--allocator", "default"])
    assert r["product_calls"] > 20 and r["limit_s"] > 0 and r["fraction"] > 0
    assert {"aten::mm", "aten::bmm"} <= set(r["products_alone_s"]) or "aten::addmm" in r["products_alone_s"]
    assert r["parts_s"]["forward"] > 0 and r["parts_s"]["backward"] > 0 and r["overhead_s"] >= 0


def test_bf16_limit_is_bf16_products_and_fp32_limit_fp32(monkeypatch) -> None:
    """Each dtype's step is measured against its own limit: under autocast the encoder's products are timed in bf16
    (the blur's stay fp32), without it every product in fp32."""
    monkeypatch.setitem(bf16_speed.MODELS, "busbra-cpu", ("vit_tiny_patch16", 32, 32, 1, 2, 4))
    args = argparse.Namespace(threads=1, rounds=1, steps=1, warmup=0, repeats=1, data=None, n_images=8)
    r = bf16_speed.child("busbra-cpu", args)
    assert set(r["fp32"]["product_dtypes"]) == {"float32"} and r["bf16-flash"]["step_s"] > 0
    bf16 = r["bf16"]["product_dtypes"]
    assert bf16.get("bfloat16", 0) > bf16.get("float32", 0) > 0  # the blur (Eq. 1) stays fp32
    assert r["speedup"] > 0 and r["bf16"]["limit_s"] > 0 and r["fp32"]["of_limit"] > 0
    assert "NOT met" in bf16_speed.table([bf16_speed.summary("busbra-cpu", [{**r, "speedup": 1.1}])],
                                         {"busbra-cpu": 1.2})


def test_allocator_speed_measures_both_settings_in_fresh_processes() -> None:
    rows = allocator_speed.main(["--step", "finetune", "--threads", "1", "--rounds", "1", "--steps", "1",
                                 "--warmup", "1"])
    assert [r["setting"] for r in rows] == list(allocator_speed.SETTINGS)
    assert all(r["step_ms"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert rows[1]["applied"] or not sys.platform.startswith("linux")


def test_demo_time_reads_the_stage_lines_the_demo_prints() -> None:
    from d2mae.experiment.plan import format_seconds

    for seconds in (18, 62):
        line = f"[experiment] [4/10] pre-train mae on phantoms (seed 0): done in {format_seconds(seconds)}"
        assert demo_time.stage_seconds(line) == ("pre-train mae on phantoms (seed 0)", seconds)
    assert demo_time.stage_seconds("[experiment] [4/10] pre-train mae on phantoms (seed 0) …") is None
    assert len(demo_time.cpu_times()) == 8  # user … steal
    for seconds in (42, 346, 4020):
        line = f"Estimated time: {format_seconds(seconds)} on this machine (AMD EPYC, 2 cores, GPU: none). This …"
        assert demo_time.estimate_seconds(line) == (seconds if seconds < 3600 else seconds // 60 * 60)


def test_crop_speed_times_both_forms_of_the_same_crops(tmp_path: Path) -> None:
    generate_phantoms(tmp_path / "ph", n=6, size=70, seed=0)
    (r,) = crop_speed.main(["--data", str(tmp_path / "ph" / "images"), "--img-size", "24", "--batch-size", "4",
                            "--threads", "1", "--rounds", "2", "--batches", "1"])
    assert r["per_window_ms"] > 0 and r["padded_ms"] > 0 and r["max_abs_diff"] < 1e-5


def test_fair_reference_runs_every_setting_pinned_and_reports_the_reference_at_its_best(tmp_path: Path) -> None:
    """Each (cores, workers, allocator) setting is its own pinned run with C − W reference threads; the summary
    names the fastest reference setting and compares d2mae with it."""
    if shutil.which("taskset") is None:
        pytest.skip("taskset is not installed")
    generate_phantoms(tmp_path / "ph", n=24, size=40, seed=0)
    rows = fair_reference.main(["--cores", "1", "--workers", "0", "1", "--data", str(tmp_path / "ph" / "images"),
                                "--n-images", "16", "--batch-size", "8", "--img-size", "32", "--rounds", "2",
                                "--steps", "1", "--warm", "0", "--allocators", "kept", "default", "--quiet"])
    assert [(r["cores"], r["workers"], r["ref_threads"], r["allocator"]) for r in rows] == [
        (1, 0, 1, "kept"), (1, 0, 1, "default"), (1, 1, 1, "kept"), (1, 1, 1, "default")]
    assert all(r["reference_img_s"] > 0 and r["d2mae_img_s"] > 0 and len(r["round_ratios"]) == 2 for r in rows)
