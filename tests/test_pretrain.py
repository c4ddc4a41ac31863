"""Pre-training reads like the paper's claims: presets are Tables 2-3's settings, the loss falls, runs reproduce and
resume exactly, bad input stops before training with one line and exit status 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from d2mae.commands import main as cli
from d2mae.io.artifacts import load_pretrained, load_weights
from d2mae.method.presets import PRESETS
from d2mae.runtime.errors import D2maeError
from d2mae.train.interrupts import NonFiniteLossError
from d2mae.train.pretrain import pretrain
from d2mae.train.pretrain_config import make_config
from tests.conftest import REPO, TINY

TINY_FLAGS = ["--arch", "vit_tiny_patch16", "--img-size", "32", "--depth", "2", "--embed-dim", "64",
              "--num-heads", "2", "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2"]


def write_images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (40, 64)) -> Path:
    """``n`` small gray PNGs: a bright disc on speckle over a dark background, various sizes and aspects."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(size[0], size[1], 2))
        yy, xx = np.mgrid[0:h, 0:w]
        cx, cy, r = rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.3 * h, 0.7 * h), rng.uniform(5, 12)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img = 0.2 + 0.3 * yy / h + 0.4 * disc + 0.03 * rng.standard_normal((h, w))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "images", 48)


def _cfg(images: Path, out: Path, **kw):
    opts = dict(TINY, data=[str(images)], out=str(out), batch_size=8, epochs=2, lr=1e-3, warmup_epochs=0.5,
                log_every_steps=1, num_workers=0, save_every_epochs=100)
    opts.update(kw)
    return make_config(**opts)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_weights(folder / "model.safetensors")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---- presets and config ----------------------------------------------------------------------------------------

def test_presets_are_the_papers_settings(tmp_path):
    def cfg(name):
        return make_config(preset=name, data=["x"], out=str(tmp_path))

    d2 = cfg("d2mae")
    assert d2.schedule.sigmas == pytest.approx([0.0] + [round(0.1 * i, 1) for i in range(1, 12)])  # 0.1…1.1, T=11
    assert (d2.blur_embed, d2.loss_on, d2.mask_ratio) == ("token", "all", 0.75)
    mae = cfg("mae")
    assert (mae.blur, mae.schedule.num_levels, mae.blur_embed, mae.loss_on) == (False, 0, "none", "masked")
    deblurr = cfg("deblurrmae")
    assert deblurr.schedule.sigmas == pytest.approx([0.0, 1.1])  # one fixed blur level
    assert (deblurr.blur_embed, deblurr.loss_on) == ("none", "all")
    assert cfg("range-0.6").schedule.sigmas[-1] == pytest.approx(0.6)  # Table 3a
    assert cfg("range-1.6").schedule.num_levels == 16
    assert cfg("embed-none").blur_embed == "none" and cfg("embed-add").blur_embed == "add"  # Table 3b
    assert set(PRESETS) == {"d2mae", "mae", "deblurrmae", "range-0.6", "range-1.6", "embed-none", "embed-add",
                            "moco-v3", "diffmae"}  # the last two: tests/test_table2.py
    assert all(cfg(p).objective == "mae" for p in PRESETS if p not in ("moco-v3", "diffmae"))


def test_precedence_defaults_preset_yaml_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"preset": "range-0.6", "sigma_stop": 0.8, "epochs": 3, "batch-size": 4}))
    parser = cli.build_parser("pretrain")
    args = parser.parse_args(["--data", "d", "--out", "o", "--config", str(path), "--epochs", "5"])
    from d2mae.commands.pretrain import config as config_from_args
    cfg = config_from_args(args)
    assert cfg.preset == "range-0.6" and cfg.blur_embed == "token"  # from the YAML's preset
    assert cfg.sigma_stop == 0.8 and cfg.batch_size == 4  # YAML beats the preset
    assert cfg.epochs == 5  # the flag beats the YAML
    args = parser.parse_args(["--data", "d", "--out", "o", "--config", str(path), "--preset", "mae"])
    cfg = config_from_args(args)
    assert cfg.preset == "mae" and not cfg.blur and cfg.sigma_stop == 0.8
    assert cfg.effective_batch(world_size=2) == 8 and cfg.resolved_lr(2) == pytest.approx(1.5e-4 * 8 / 256)


# ---- training ---------------------------------------------------------------------------------------------------

def test_short_run_lowers_the_loss_and_writes_a_pretrained_folder(images, tmp_path, capsys):
    out = pretrain(_cfg(images, tmp_path / "run", epochs=20, lr=3e-3, data_path="memory"))
    losses = [r["loss"] for r in _metrics(out)]
    assert len(losses) == 20 * 6
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6])
    assert {p.name for p in out.iterdir()} == {".d2mae-output", "model.safetensors", "config.json", "pretrain.yaml",
                                              "pretrain_hashes.txt",
                                              "metrics.jsonl", "resume.pt", "tensorboard"}
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard is in the test extra
    record = _metrics(out)[-1]
    assert set(record) == {"step", "epoch", "loss", "lr", "images_per_s", "time"} and record["step"] == 120
    model = load_pretrained(out)
    assert model.config.mean is not None and model.config.std is not None  # the data set's own statistics
    saved = yaml.safe_load((out / "pretrain.yaml").read_text())
    assert saved["mean"] == model.config.mean and saved["epochs"] == 20
    printed = capsys.readouterr().err  # progress goes to stderr
    assert "epoch 20/20" in printed  # one line per epoch when stdout is not a terminal


def test_same_seed_same_weights_and_the_files_round_trip(images, tmp_path):
    a = pretrain(_cfg(images, tmp_path / "a", max_steps=4))
    b = pretrain(_cfg(images, tmp_path / "b", max_steps=4))
    c = pretrain(_cfg(images, tmp_path / "c", max_steps=4, seed=1))
    assert _equal(_state(a), _state(b))
    assert not _equal(_state(a), _state(c))
    resume = torch.load(a / "resume.pt", weights_only=True)  # no pickled objects
    assert resume["step"] == 4 and resume["format"] == "d2mae-pretrain-resume"
    assert _equal(resume["model"], _state(a))  # safetensors holds exactly the trained weights
    loaded = load_pretrained(a).state_dict()
    assert _equal({k: v for k, v in loaded.items()}, _state(a))
    assert {"python", "numpy", "torch"} <= set(resume["rng"])
    assert resume["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)


def test_no_weight_decay_on_norms_biases_and_tokens(images, tmp_path):
    from d2mae.method.models import DeblurMAE
    from d2mae.train.optim import build_optimizer
    cfg = _cfg(images, tmp_path / "o")
    model = DeblurMAE(cfg.model_config())
    opt = build_optimizer(model, cfg, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"encoder.cls_token", "encoder.blur_token", "mask_token"} <= no_decay
    assert all(n.endswith(".bias") or "norm" in n or "token" in n for n in no_decay)
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "decoder_pred.weight" in decay


def test_loader_workers_and_memory_cache_are_each_deterministic(images, tmp_path):
    w0 = pretrain(_cfg(images, tmp_path / "w0", max_steps=3, data_path="loader", num_workers=0))
    w2 = pretrain(_cfg(images, tmp_path / "w2", max_steps=3, data_path="loader", num_workers=2))
    assert _equal(_state(w0), _state(w2))  # crops depend on (seed, epoch, image), not on the worker
    m1 = pretrain(_cfg(images, tmp_path / "m1", max_steps=3, data_path="memory", accum_iter=2, batch_size=4))
    m2 = pretrain(_cfg(images, tmp_path / "m2", max_steps=3, data_path="memory", accum_iter=2, batch_size=4))
    assert _equal(_state(m1), _state(m2))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(images, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ .*resume.pt \(step \d+\) is kept"):
        pretrain(_cfg(images, out, lr=1e30, warmup_epochs=0, checkpoint_every_steps=1))
    state = torch.load(out / "resume.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ---- resume -----------------------------------------------------------------------------------------------------

RESUME_OPTS = dict(batch_size=4, epochs=4, checkpoint_every_steps=3, data_path="loader")  # 12 steps per epoch


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """An uninterrupted run (in this process, no loader workers)."""
    return pretrain(_cfg(images, tmp_path_factory.mktemp("ref") / "run", **RESUME_OPTS))


def _flags(images: Path, out: Path, workers: int) -> list[str]:
    return ["pretrain", "--data", str(images), "--out", str(out), *TINY_FLAGS, "--batch-size", "4", "--epochs", "4",
            "--lr", "1e-3", "--warmup-epochs", "0.5", "--log-every-steps", "1", "--checkpoint-every-steps", "3",
            "--data-path", "loader", "--num-workers", str(workers)]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "d2mae", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.is_file() and (out / "resume.pt").is_file():
            lines = path.read_text().splitlines()
            if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the run did not reach the step in time")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(images, tmp_path, reference):
    out = tmp_path / "killed"
    proc = _start(_flags(images, out, workers=1))
    _wait_for_step(proc, out, 16)  # inside the second epoch (steps 13-24; checkpoints after steps 15, 18, 21)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    state = torch.load(out / "resume.pt", weights_only=True)
    assert 15 <= state["step"] < 48 and state["micro_step"] == state["step"] % 12  # a mid-run checkpoint
    assert cli.main(_flags(images, out, workers=0) + ["--resume"]) == 0
    assert _equal(_state(out), _state(reference))  # bit-identical on CPU
    steps = [r["step"] for r in _metrics(out)]
    assert steps == list(range(1, 49))  # the log has each step once


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_143(images, tmp_path, reference):
    out = tmp_path / "term"
    proc = _start(_flags(images, out, workers=0))
    _wait_for_step(proc, out, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "--resume" in err
    state = torch.load(out / "resume.pt", weights_only=True)
    assert state["step"] >= 5 and [r["step"] for r in _metrics(out)][-1] == state["step"]
    assert cli.main(_flags(images, out, workers=0) + ["--resume"]) == 0
    assert _equal(_state(out), _state(reference))


def test_resume_refuses_changed_settings_and_a_finished_run_is_left_alone(images, tmp_path, capsys):
    out = pretrain(_cfg(images, tmp_path / "r", max_steps=2))
    with pytest.raises(D2maeError, match="already holds a pre-training run"):
        pretrain(_cfg(images, out, max_steps=2))
    with pytest.raises(D2maeError, match="batch_size"):
        pretrain(_cfg(images, out, max_steps=2, batch_size=4, resume="auto"))
    before = _state(out)
    assert pretrain(_cfg(images, out, max_steps=2, resume="auto")) == out
    assert "already complete" in capsys.readouterr().err
    assert _equal(before, _state(out))


# ---- bad input: one line, exit status 2, before training ----------------------------------------------------------

def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err.strip()


def _bad_setup(tmp_path: Path, case: str) -> tuple[list[str], str]:
    good = write_images(tmp_path / "good", 8)
    out = ["--out", str(tmp_path / "out")]
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return ["--data", str(tmp_path / "empty"), *out, *TINY_FLAGS], "no images found"
    if case == "missing path":
        return ["--data", str(tmp_path / "nope"), *out, *TINY_FLAGS], "does not exist"
    if case == "truncated image":
        data = (good / "img000.png").read_bytes()
        (good / "img000.png").write_bytes(data[: len(data) // 2])
        return ["--data", str(good), *out, *TINY_FLAGS], "img000.png"
    if case == "image smaller than a patch":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(good / "tiny.png")
        return ["--data", str(good), *out, *TINY_FLAGS], "tiny.png"
    if case == "size not divisible by the patch":
        return ["--data", str(good), *out, *TINY_FLAGS, "--img-size", "40"], "--img-size"
    if case == "sigma not positive":
        return ["--data", str(good), *out, *TINY_FLAGS, "--sigma-start", "0"], "--sigma-start"
    if case == "start past stop":
        return ["--data", str(good), *out, *TINY_FLAGS, "--sigma-start", "1.2", "--sigma-stop", "0.6"], "--sigma-stop"
    if case == "unknown preset in YAML":
        (tmp_path / "c.yaml").write_text("preset: dmae\n")
        return ["--data", str(good), *out, *TINY_FLAGS, "--config", str(tmp_path / "c.yaml")], "--preset"
    if case == "batch larger than the data":
        return ["--data", str(good), *out, *TINY_FLAGS, "--batch-size", "16"], "--batch-size"
    if case == "bad option value":
        return ["--data", str(good), *out, *TINY_FLAGS, "--epochs", "0"], "--epochs"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["empty folder", "missing path", "truncated image", "image smaller than a patch",
                                  "size not divisible by the patch", "sigma not positive", "start past stop",
                                  "unknown preset in YAML", "batch larger than the data", "bad option value"])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, case):
    args, expected = _bad_setup(tmp_path, case)
    code, err = _run_cli(["pretrain", *args], capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("d2mae pretrain: error:"), err
    assert expected in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("flag", [["--preset", "dmae"], ["--model", "vit_huge_patch14"]])
def test_unknown_preset_or_model_flag_exits_2(tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *flag])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_skip_bad_leaves_bad_images_out_and_lists_them(tmp_path, capsys):
    good = write_images(tmp_path / "imgs", 9)
    (good / "img003.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipped 1 of 9"):
        code = cli.main(["pretrain", "--data", str(good), "--out", str(out), *TINY_FLAGS, "--batch-size", "8",
                         "--max-steps", "1", "--skip-bad"])
    assert code == 0
    assert "img003.png" in (out / "bad_images.txt").read_text()
    assert (out / "model.safetensors").is_file()


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for word in ("--data", "--out", "--preset", "--resume", "--batch-size", "--config", "deblurrmae", "torchrun"):
        assert word in text


def test_memory_data_path_falls_back_to_the_loader_when_the_cache_does_not_fit(images, tmp_path, monkeypatch, capsys):
    from d2mae.data.cache import DecodedCache, cache_bytes
    from d2mae.data.sources import find_images
    from d2mae.runtime.distributed import DistContext
    from d2mae.train import batches as pt
    cpu, ctx = torch.device("cpu"), DistContext()
    refs = find_images(images)
    need = cache_bytes(refs, 32)
    assert need == DecodedCache(refs, 32).nbytes  # the estimate from the headers is the cache's size
    assert pt.choose_data_path(_cfg(images, tmp_path), refs, cpu, ctx)[0] == "memory"
    monkeypatch.setattr(pt, "_available_memory", lambda device: 4 * need - 4)
    assert pt.choose_data_path(_cfg(images, tmp_path), refs, cpu, ctx)[0] == "loader"
    assert pt.choose_data_path(_cfg(images, tmp_path, data_path="memory"), refs, cpu, ctx)[0] == "loader"
    assert "using the DataLoader instead" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# the target is the original image, as sharp as PIL's crop of the file, on every data path (Eq. 3)
# --------------------------------------------------------------------------------------------------------------------

def _reference_crop(ref: str, box: tuple[float, ...], flip: bool, size: int) -> torch.Tensor:
    """PIL's antialiased bicubic crop of the original file: box (cx, cy, w, h) in fractions of the image."""
    from d2mae.data.dataset import resize_box
    from d2mae.data.decode import load_image

    a = load_image(ref)
    h, w = a.shape[:2]
    cx, cy, bw, bh = box
    pixels = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
    return torch.from_numpy(resize_box(a, pixels, size, flip=flip))


def _memory_batch_sigmas(refs: list[str], size: int, rank: int, world: int, device: str = "cpu") -> list[float]:
    from d2mae.data.cache import DecodedCache
    from d2mae.data.sampler import EpochBatchSampler
    from d2mae.data.sharpness import equivalent_sigma
    from d2mae.train.batches import MemoryBatches

    sampler = EpochBatchSampler(len(refs), 3, seed=5, rank=rank, world_size=world)
    batches = MemoryBatches(DecodedCache(refs, size), sampler, torch.device(device))
    idx, ((boxes, flip),) = batches.plan(0, 0)  # one view
    x = next(batches.epoch(0, 0)).cpu()  # [B, C, S, S]: what train_step receives
    return [equivalent_sigma(x[k], _reference_crop(refs[int(i)], tuple(float(b[k]) for b in boxes), bool(flip[k]),
                                                   size)) for k, i in enumerate(idx.tolist())]


@pytest.mark.parametrize("rank,world", [(0, 1), (0, 2), (1, 2)])
def test_sharp_memory_path_batches_on_busbra(busbra: Path, rank: int, world: int) -> None:
    """What train_step receives on the memory path — one process, or either rank's slice of a DDP global batch —
    is PIL's crop of the original BUS-BRA file to σ ≤ 0.1 px."""
    from d2mae.data.sources import find_images

    refs = find_images([busbra / "images"])[::150][:12]
    sigmas = _memory_batch_sigmas(refs, 96, rank, world)
    assert max(abs(s) for s in sigmas) <= 0.1, sigmas


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sharp_memory_path_batches_on_cuda(busbra: Path) -> None:
    from d2mae.data.sources import find_images

    refs = find_images([busbra / "images"])[::150][:12]
    sigmas = _memory_batch_sigmas(refs, 96, 0, 1, "cuda")
    assert max(abs(s) for s in sigmas) <= 0.1, sigmas


def test_sharp_loader_path_batches_on_busbra(busbra: Path) -> None:
    """The loader path's pre-training crops are PIL's crop of the original file (σ ≤ 0.1 px), whatever the rank."""
    from torchvision.transforms import RandomResizedCrop

    from d2mae.data.dataset import CROP_RATIO, CROP_SCALE, ImageDataset, SeededDataset
    from d2mae.data.decode import load_image
    from d2mae.data.sampler import EpochBatchSampler
    from d2mae.data.sharpness import equivalent_sigma
    from d2mae.data.sources import find_images

    refs = find_images([busbra / "images"])[::150][:8]
    sampler = EpochBatchSampler(len(refs), 4, seed=5, rank=1, world_size=2)
    data = SeededDataset(ImageDataset(refs, 96, augment="mae"))
    for index, seed in next(iter(sampler)):
        x = data[(index, seed)][0]
        torch.default_generator.manual_seed(seed)  # the draws SeededDataset made for this item
        a = load_image(refs[index])
        top, left, h, w = RandomResizedCrop.get_params(torch.empty(1, *a.shape[:2]), list(CROP_SCALE),
                                                       list(CROP_RATIO))
        flip = bool(torch.rand(()) < 0.5)
        box = ((left + w / 2) / a.shape[1], (top + h / 2) / a.shape[0], w / a.shape[1], h / a.shape[0])
        assert abs(equivalent_sigma(x, _reference_crop(refs[index], box, flip, 96))) <= 0.1


@pytest.mark.parametrize("preset,levels", [("d2mae", set(range(1, 12))), ("mae", {0}), ("deblurrmae", {1})])
def test_pretraining_draws_a_blur_level_per_sample_and_masks_75_percent(images, tmp_path, monkeypatch, preset,
                                                                         levels):
    """Section 2.2: each sample of a step gets its own t ~ U{1..T} (MAE: no blur, t = 0; DeblurrMAE: its one
    level, σ = 1.1), and 75% of its patches are masked."""
    from d2mae.method.models import DeblurMAE

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = DeblurMAE.forward

    def spy(self, x, t=None, mask_ratio=None, noise=None):
        loss, pred, mask = original(self, x, t, mask_ratio, noise)
        seen.append((t.detach().clone(), mask.detach().clone()))
        return loss, pred, mask

    monkeypatch.setattr(DeblurMAE, "forward", spy)
    pretrain(_cfg(images, tmp_path / "run", preset=preset, max_steps=6))
    t = torch.cat([s[0] for s in seen])  # [6 · B]
    assert set(t.long().tolist()) <= levels and t.shape == (48,)
    if preset == "d2mae":
        assert len(set(t.tolist())) >= 8  # 48 draws from 11 levels
        assert all(len(set(s[0].tolist())) > 1 for s in seen)  # per sample, not one level per batch
    masks = torch.cat([s[1] for s in seen])  # [6 · B, N]
    assert torch.all(masks.sum(1) == 3)  # N = 4 patches, 75% masked


def test_a_mask_that_leaves_no_patch_visible_is_refused(images, tmp_path):
    with pytest.raises(D2maeError, match="masks every one of the 4 patches") as caught:
        _cfg(images, tmp_path / "r", mask_ratio=0.8)  # 32 px: 4 patches, int(4 × 0.2) = 0 visible
    assert caught.value.option == "mask_ratio"
