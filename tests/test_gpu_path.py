"""The GPU code path, exercised without a GPU: what a CUDA device would be given (bf16 autocast, fused AdamW, SDPA
attention) asked as decisions; bf16 autocast on the CPU against fp32 for pre-training and fine-tuning losses, and a
short bf16 run that learns; torch.compile against eager through the GPU script's own dry run (every pass of
benchmarks/gpu.sh on the CPU at toy size)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurClassifier, DeblurMAE
from d2mae.runtime.device import amp_dtype, plan_for
from d2mae.runtime.errors import D2maeError
from d2mae.train.optim import adamw
from tests.conftest import REPO, TINY


def test_a_cuda_device_with_bf16_gets_bf16_autocast_fused_adamw_and_sdpa() -> None:
    gpu = plan_for("cuda", "auto", bf16_supported=True)
    assert gpu.amp is torch.bfloat16 and gpu.fused_adamw and gpu.sdpa
    assert plan_for("cuda", "auto", bf16_supported=False).amp is None  # an older GPU: fp32
    assert plan_for("cuda", "fp32", bf16_supported=True).amp is None
    cpu = plan_for("cpu")
    assert cpu.amp is None and cpu.fused_adamw  # bf16 autocast is slower on CPUs without bf16 units
    assert plan_for("cpu", "bf16").amp is torch.bfloat16  # asked for: given
    assert amp_dtype(torch.device("cpu")) is None
    with pytest.raises(D2maeError, match="precision"):
        plan_for("cuda", "fp16")


def test_auto_takes_bf16_on_a_cpu_with_bf16_units_for_an_encoder_wide_enough_and_says_why() -> None:
    """As pure data (no such CPU needed): a CPU reported as having bf16 units gets bf16 autocast for ViT-Tiny and
    wider (BF16_MIN_WIDTH = 192, measured: docs/threads.md), fp32 for narrower test-sized models; a CPU without them,
    fp32; the flags of AMD Zen 4 / Intel (avx512_bf16, amx_bf16) and Arm (bf16) count, AVX2 alone does not."""
    from d2mae.runtime.device import cpu_has_bf16

    for width in (192, 384, 768, 1024):
        plan = plan_for("cpu", "auto", bf16_supported=True, width=width)
        assert plan.amp is torch.bfloat16 and plan.precision == "bf16" and "bf16 units" in plan.why
    assert plan_for("cpu", "auto", bf16_supported=True, width=64).amp is None
    assert plan_for("cpu", "auto", bf16_supported=False, width=768).amp is None
    assert "without native bf16" in plan_for("cpu", "auto", bf16_supported=False, width=768).why
    assert plan_for("cpu", "fp32", bf16_supported=True, width=768).amp is None  # forced either way
    assert plan_for("cpu", "bf16", bf16_supported=False, width=192).amp is torch.bfloat16
    assert cpu_has_bf16("flags\t\t: fpu sse avx2 avx512f avx512_bf16 vaes") and cpu_has_bf16("flags : amx_bf16 amx_tile")
    assert cpu_has_bf16("Features\t: fp asimd evtstrm bf16 i8mm") and not cpu_has_bf16("flags : fpu sse4_2 avx2 fma")


def test_the_blur_search_runs_in_fp32_whatever_the_precision(monkeypatch, tmp_path: Path) -> None:
    """OBS's per-level losses differ by under 1%, so they are computed in fp32 even where training takes bf16: with
    every device forced to bf16, run_obs's losses still equal the fp32 computation to float rounding."""
    from d2mae.eval import infer as infer_module
    from d2mae.eval.obs import run_obs
    from d2mae.method.obs import ObsSpec
    from d2mae.runtime import device as device_module
    from tests.test_obs import make_images

    real = device_module.plan_for
    monkeypatch.setattr(device_module, "plan_for", lambda d, p="auto", bf16_supported=False, width=None:
                        real(d, "bf16" if p == "auto" else p, bf16_supported, width))
    assert infer_module.amp_dtype(torch.device("cpu"), "auto") is torch.bfloat16  # training would take bf16 here
    torch.manual_seed(0)
    model = DeblurMAE(ModelConfig(**TINY)).eval()
    refs = make_images(tmp_path, 3)
    table = run_obs(model, refs, spec=ObsSpec("search", 2), batch_size=3, progress=False)
    x = infer_module.decode_views(refs, 32, 1)
    with torch.no_grad():
        for j, t in enumerate(table.levels):
            want = model.deblur_loss(x, torch.full((3,), float(t))).double().numpy()
            assert np.allclose(table.losses[:, j], want, rtol=1e-6, atol=0)


def test_the_models_attention_and_optimizer_follow_the_plan() -> None:
    """Every attention block of the encoder and decoder runs timm's fused path (F.scaled_dot_product_attention: the
    flash and memory-efficient kernels on a GPU), and AdamW is the fused kernel, as the device plan says."""
    model = DeblurMAE(ModelConfig(**TINY))
    blocks = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(blocks) == TINY["depth"] + TINY["decoder_depth"]
    assert all(b.fused_attn is plan_for("cuda", bf16_supported=True).sdpa is True for b in blocks)
    optimizer = adamw([{"params": list(model.parameters())}], lr=1e-3)
    assert optimizer.defaults["fused"] is plan_for("cpu").fused_adamw is True


def test_cpu_bf16_attention_avoids_the_flash_kernel() -> None:
    """Under d2mae's CPU bf16 autocast the attention runs on SDPA's math path (batched products in fp32: it upcasts
    bf16 on the CPU), not PyTorch's CPU flash kernel in bf16 (slower than fp32); in fp32 it keeps the flash kernel."""
    from torch.profiler import ProfilerActivity, profile

    from d2mae.runtime.device import autocast

    model = DeblurMAE(ModelConfig(**TINY)).train()
    x, t, noise = _batch()
    cpu = torch.device("cpu")
    ops = {}
    for dtype in (torch.bfloat16, None):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            with autocast(cpu, dtype):
                loss, _, _ = model(x, t, noise=noise)
            loss.backward()
        ops[dtype] = [(e.name, str(e.input_dtypes[0]) if e.input_dtypes else "") for e in prof.events()]
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert not any(name.startswith(flash) for name, _ in ops[torch.bfloat16])
    assert ("aten::_scaled_dot_product_attention_math", "c10::BFloat16") in ops[torch.bfloat16]
    assert ("aten::addmm", "c10::BFloat16") in ops[torch.bfloat16]  # the linear layers still run in bf16
    assert any(name == flash for name, _ in ops[None])


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.rand(n, 1, 32, 32, generator=g)
    t = torch.randint(1, 12, (n,), generator=g).float()
    noise = torch.rand(n, ModelConfig(**TINY).num_patches, generator=g)
    return x, t, noise


def test_bf16_and_fp32_agree_on_the_fine_tuning_loss() -> None:
    """Cross-entropy of the classifier on one fixed batch, bf16 autocast against fp32: within 2% (8 mantissa bits)."""
    clf = DeblurClassifier(ModelConfig(**TINY), 2).eval()
    x, t, _ = _batch()
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    with torch.no_grad():
        fp32 = torch.nn.functional.cross_entropy(clf(x, t), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = torch.nn.functional.cross_entropy(clf(x, t).float(), y)
    assert torch.isfinite(bf16) and abs(float(bf16) - float(fp32)) <= 0.02 * float(fp32)


def test_a_short_bf16_pretraining_run_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = DeblurMAE(ModelConfig(**TINY))
    optimizer = adamw([{"params": list(model.parameters())}], lr=2e-3, betas=(0.9, 0.95))
    x, t, noise = _batch()
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = model(x, t, noise=noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert all(map(lambda v: v == v, losses))  # no NaN
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on the CPU needs a C "
                    "compiler (inductor builds its kernels); none is on this machine")
def test_the_gpu_script_dry_run_runs_every_pass_and_compiled_matches_eager(tmp_path: Path) -> None:
    """``bash benchmarks/gpu.sh --dry-run`` runs the eager and the torch.compile pass on the CPU at toy size; the
    compiled step's first loss equals the eager one (same seed, weights, batch), and the report carries the bf16
    gap, the anchors and the OBS rate."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-2000:]
    eager = json.loads((tmp_path / "eager" / "gpu_bench.json").read_text())
    compiled = json.loads((tmp_path / "compiled" / "gpu_bench.json").read_text())
    assert [r["mode"] for r in eager["rows"]] == ["eager"] and [r["mode"] for r in compiled["rows"]] == ["compiled"]
    a, b = eager["rows"][0]["loss_first"], compiled["rows"][0]["loss_first"]
    assert abs(a - b) <= 1e-3 * abs(a), (a, b)
    assert eager["bf16_vs_fp32"]["relative_gap"] < 0.02
    text = (tmp_path / "eager" / "gpu_bench.md").read_text()
    assert "Anchors: about 2,000 img/s per A100" in text and "bf16 against fp32" in text and "OBS" in text
