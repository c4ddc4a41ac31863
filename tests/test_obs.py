"""Optimal blurriness search (Eq. 4-5): argmin level, batching, the reusable table and its staleness checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2mae.commands.main import main
from d2mae.data.decode import content_hash
from d2mae.eval.obs import obs_strips, run_obs
from d2mae.io.artifacts import load_pretrained, model_sha256, save_pretrained
from d2mae.io.obs_table import ObsTable
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurMAE
from d2mae.method.obs import ObsSpec, search_losses, select_level
from d2mae.runtime.errors import D2maeError
from tests.conftest import TINY


def make_pretrained(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny DeblurMAE with random weights, saved as a pre-trained folder."""
    torch.manual_seed(seed)
    model = DeblurMAE(ModelConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # give the decoder some structure so that levels differ clearly
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_pretrained(model, folder)


def make_images(folder: Path, n: int = 10, seed: int = 0, sizes: tuple[int, ...] = (36, 40, 48)) -> list[str]:
    """Smooth-ish random gray PNGs of varying size and blurriness."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        s = sizes[i % len(sizes)]
        a = gaussian_filter(rng.random((s, s + 4)), sigma=0.3 + 0.25 * (i % 5))
        a = (a - a.min()) / (a.max() - a.min() + 1e-9)
        path = folder / f"img{i:02d}.png"
        Image.fromarray((a * 255).astype(np.uint8)).save(path)
        out.append(str(path))
    return out


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, list[str], DeblurMAE]:
    pre = make_pretrained(tmp_path / "pre")
    refs = make_images(tmp_path / "imgs", 10)
    return pre, refs, load_pretrained(pre)


def _oracle(model: DeblurMAE, eps: dict[int, float]) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Make ``model`` reconstruct x + ε_t · n (n a ±1 checkerboard) from the x and t its encoder received, so that
    L_deblur^(t) against the original is (ε_t / std)² exactly; returns the (x, t, mask ratio) calls it saw."""
    calls: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    model.encoder.register_forward_pre_hook(lambda _m, args: calls.append((args[0], args[1], float(args[2]))))

    def decode(latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x, t, _ = calls[-1]
        h, w = x.shape[-2:]
        n = torch.tensor([[(-1.0) ** (i + j) for j in range(w)] for i in range(h)])  # [H, W], n² = 1
        e = torch.tensor([eps[int(v)] for v in t.tolist()])[:, None, None, None]  # [B, 1, 1, 1]
        return model.patchify(model.encoder.normalize(x + e * n))

    model.forward_decoder = decode
    return calls


def test_obs_picks_the_level_whose_reconstruction_is_closest_to_the_original(setup) -> None:
    """Eq. 4-5 against an independent oracle: t* = argmin_t ‖x̂^(t) − x‖² with x the original view, searched at
    t = 1, 3, …, 11 (s = 2) with mask ratio 0 on the deterministic view."""
    from d2mae.data.dataset import center_box, resize_box
    from d2mae.data.decode import load_image

    _, refs, model = setup
    eps = {1: 0.05, 3: 0.04, 5: 0.03, 7: 0.01, 9: 0.02, 11: 0.06}
    calls = _oracle(model, eps)
    table = run_obs(model, refs, spec=ObsSpec("search", 2), batch_size=4, progress=False)
    assert table.levels == [1, 3, 5, 7, 9, 11]
    std = float(model.encoder.pixel_std.flatten()[0])
    expected = np.array([(eps[t] / std) ** 2 for t in table.levels])
    for i in range(len(refs)):
        np.testing.assert_allclose(table.losses[i], expected, rtol=1e-4)
    assert table.t_star.tolist() == [7.0] * len(refs)
    assert table.sigma_star.tolist() == [pytest.approx(0.7)] * len(refs)
    assert {ratio for _, _, ratio in calls} == {0.0}  # Eq. 4: mask ratio 0
    views = torch.cat([x for x, _, _ in calls]).unique(dim=0)  # every image, once per level
    expected_views = torch.stack([torch.from_numpy(resize_box(a, center_box(*a.shape[:2]), 32))
                                  for a in map(load_image, refs)])
    assert views.shape[0] == len(refs)
    for v in expected_views:
        assert float((views - v).abs().flatten(1).max(1).values.min()) <= 1e-6


def test_batched_obs_equals_one_image_one_level_at_a_time(setup) -> None:
    _, refs, model = setup
    batched = run_obs(model, refs, batch_size=8, max_rows=None, progress=False)
    single = run_obs(model, refs, batch_size=1, max_rows=1, progress=False)
    np.testing.assert_allclose(batched.losses, single.losses, rtol=1e-4, atol=1e-6)
    assert (batched.t_star == single.t_star).all()
    x = torch.rand(3, 1, 32, 32)
    rows = search_losses(model, x, [1, 4], max_rows=2)  # chunks cut through images
    assert rows.shape == (3, 2)
    np.testing.assert_allclose(rows, search_losses(model, x, [1, 4]), rtol=1e-4, atol=1e-6)


def test_ties_go_to_the_smaller_level() -> None:
    losses = np.array([[0.5, 0.2, 0.2, 0.3], [0.1, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]])
    assert select_level(losses, [1, 3, 5, 7]).tolist() == [3, 1, 7]


def test_search_step_none_and_fixed(setup) -> None:
    _, refs, model = setup
    assert run_obs(model, refs[:2], spec=ObsSpec.parse("search", 1), progress=False).levels == list(range(1, 12))
    assert run_obs(model, refs[:2], spec=ObsSpec.parse("search", 3), progress=False).levels == [1, 4, 7, 10]
    none = run_obs(model, refs[:2], spec=ObsSpec.parse("none"), progress=False)
    assert none.t_star.tolist() == [0, 0] and none.sigma_star.tolist() == [0, 0] and none.levels == []
    fixed = run_obs(model, refs[:2], spec=ObsSpec.parse("fixed:0.5"), progress=False)
    assert fixed.t_star.tolist() == [pytest.approx(5.0)] * 2 and fixed.sigma_star.tolist() == [0.5, 0.5]
    with pytest.raises(D2maeError, match="outside the model's blur schedule"):
        run_obs(model, refs[:2], spec=ObsSpec.parse("fixed:2.5"), progress=False)
    with pytest.raises(D2maeError, match="obs: unknown setting 'maybe'"):
        ObsSpec.parse("maybe")


def test_model_without_blur_searches_only_level_zero(tmp_path: Path) -> None:
    model = load_pretrained(make_pretrained(tmp_path / "mae", blur=False, blur_embed="none", loss_on="masked"))
    table = run_obs(model, make_images(tmp_path / "i", 3), progress=False)
    assert table.levels == [0] and table.t_star.tolist() == [0, 0, 0]


def test_table_is_reused_and_a_stale_one_refused(setup, tmp_path: Path) -> None:
    pre, refs, model = setup
    sha = model_sha256(pre)
    table = run_obs(model, refs, model_hash=sha, progress=False)
    table.save(tmp_path / "obs")
    loaded = ObsTable.load(tmp_path / "obs" / "obs.csv")
    hashes = [content_hash(r) for r in refs]
    t = loaded.lookup(refs[::-1], hashes[::-1], sha, ObsSpec(), 32)  # order-free, matched by content
    assert t.tolist() == table.t_star[::-1].tolist()
    assert loaded.sigma_star.tolist() == table.sigma_star.tolist() == (0.1 + 0.1 * (table.t_star - 1)).round(6).tolist()
    np.testing.assert_allclose(loaded.losses, table.losses, rtol=1e-5)
    other = make_pretrained(tmp_path / "other", seed=1)
    with pytest.raises(D2maeError, match="another pre-trained model"):
        loaded.lookup(refs, hashes, model_sha256(other))
    with pytest.raises(D2maeError, match="made with OBS search \\(s = 2\\), but search \\(s = 1\\)"):
        loaded.lookup(refs, hashes, sha, ObsSpec("search", 1))
    extra = make_images(tmp_path / "more", 1, seed=5)
    with pytest.raises(D2maeError, match="lacks 1 of the 11 images"):
        loaded.lookup(refs + extra, hashes + [content_hash(extra[0])], sha)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(refs[3])  # the image changes after the search
    with pytest.raises(D2maeError, match="1 image\\(s\\) changed since the table was written.*img03"):
        loaded.lookup(refs, [content_hash(r) for r in refs], sha)
    (tmp_path / "obs" / "obs.json").unlink()
    with pytest.raises(D2maeError, match="no obs.json"):
        ObsTable.load(tmp_path / "obs")


def test_strip_arrays_for_the_figure(setup) -> None:
    _, refs, model = setup
    (strip,) = obs_strips(model, refs[:1], ObsSpec("search", 4))
    assert strip.levels == [1, 5, 9]
    assert strip.original.shape == (32, 32, 1)
    for arr in (strip.blurred, strip.deblurred, strip.difference):
        assert arr.shape == (3, 32, 32, 1) and arr.min() >= 0 and arr.max() <= 1
    table = run_obs(model, refs[:1], spec=ObsSpec("search", 4), progress=False)
    np.testing.assert_allclose(strip.losses, table.losses[0], rtol=1e-4)
    assert strip.t_star == table.t_star[0]
    np.testing.assert_allclose(strip.difference, np.abs(strip.deblurred - strip.original[None]), atol=1e-6)


def test_obs_command_writes_table_summary_and_figures(setup, tmp_path: Path, capsys) -> None:
    pre, refs, _ = setup
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,scanner\n" + "".join(
        f"{r},{'benign' if i % 2 else 'malignant'},{'AB'[i % 3 == 0]}\n" for i, r in enumerate(refs)))
    out = tmp_path / "obs_out"
    rc = main(["obs", "--pretrained", str(pre), "--labels", str(labels), "--group-by", "scanner", "--out", str(out),
               "--workers", "0", "--strips", "1"])
    assert rc == 0
    for name in ("obs.csv", "obs.json", "obs_summary.md", "obs_summary.json", "obs_sigma_hist.png",
                 "obs_strip_1.png", "obs.yaml"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "obs.json").read_text())
    assert meta["model_sha256"] == model_sha256(pre) and meta["search_step"] == 2 and meta["n_images"] == 10
    summary = json.loads((out / "obs_summary.json").read_text())
    assert set(summary["groups"]) == {"A", "B", "all"} and summary["groups"]["all"]["n"] == 10
    assert "| A |" in capsys.readouterr().out
    header = (out / "obs.csv").read_text().splitlines()[0]
    assert header == "path,content_hash,t_star,sigma_star,loss_t1,loss_t3,loss_t5,loss_t7,loss_t9,loss_t11"


def test_obs_command_bad_inputs(setup, tmp_path: Path, capsys) -> None:
    pre, refs, _ = setup
    imgs = str(Path(refs[0]).parent)
    assert main(["obs", "--pretrained", str(tmp_path / "nope"), "--data", imgs, "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(pre, broken)
    (broken / "model.safetensors").unlink()
    assert main(["obs", "--pretrained", str(broken), "--data", imgs, "--out", str(tmp_path / "o")]) == 2
    assert "model.safetensors does not exist" in capsys.readouterr().err
    assert main(["obs", "--pretrained", str(pre), "--data", imgs, "--out", str(tmp_path / "o"), "--obs",
                 "fixed:3"]) == 2
    assert "outside the model's blur schedule" in capsys.readouterr().err
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(Path(imgs) / "tiny.png")
    assert main(["obs", "--pretrained", str(pre), "--data", imgs, "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "tiny.png is 6x6 pixels" in capsys.readouterr().err
