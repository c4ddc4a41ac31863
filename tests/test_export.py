"""Exported encoders are the d2mae encoder: BLU(t) baked into timm's register token (Eq. 2), sin-emb(t) into the
patch bias for ``add`` (Table 3b), features equal on the same blurred, normalised input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch

from d2mae.commands.main import main
from d2mae.io.artifacts import save_pretrained
from d2mae.io.export import export_encoder, resolve_blur_level
from d2mae.method.blur import gaussian_blur
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurMAE
from d2mae.runtime.errors import D2maeError
from tests.conftest import TINY

MEAN, STD = [0.3], [0.2]


def _pretrained(folder: Path, blur_embed: str = "token", **overrides) -> DeblurMAE:
    """A tiny pre-trained folder with every weight perturbed (so biases, tokens and norms all matter)."""
    model = DeblurMAE(ModelConfig(**{**TINY, "blur_embed": blur_embed, "mean": MEAN, "std": STD, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_pretrained(model, folder)
    return model.eval()


def _inputs(model: DeblurMAE, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images in [0,1], their levels, and what an exported model is fed: blur at σ_t, then (x - mean) / std."""
    x = torch.rand(3, model.config.in_chans, 32, 32)
    levels = torch.full((3,), float(t))
    fed = (gaussian_blur(x, model.schedule.sigma(levels)) - torch.tensor(MEAN).view(1, -1, 1, 1)) / \
        torch.tensor(STD).view(1, -1, 1, 1)
    return x, levels, fed


@pytest.mark.parametrize("blur_embed", ["token", "add", "none"])
def test_timm_local_dir_features_equal_d2mae(tmp_path, blur_embed):
    model = _pretrained(tmp_path / "pre", blur_embed)
    out = export_encoder(tmp_path / "pre", tmp_path / "timm", "timm", t=4)  # σ_4 = 0.4: a real blur
    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert vit.num_prefix_tokens == model.config.num_prefix_tokens  # [CLS, BLU(t)] or [CLS]
    x, levels, fed = _inputs(model, 4)
    with torch.no_grad():
        ours, _, _ = model.encoder(x, levels)  # [B, prefix + N, D]
        theirs = vit.forward_features(fed)
        pooled = vit.forward_head(theirs, pre_logits=True)  # mean of the patch tokens
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(pooled, ours[:, model.config.num_prefix_tokens:].mean(1), atol=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrained_cfg"]["mean"] == pytest.approx(MEAN) and cfg["pretrained_cfg"]["std"] == pytest.approx(STD)
    assert cfg["model_args"]["reg_tokens"] == (1 if blur_embed == "token" else 0)
    info = json.loads((out / "d2mae_export.json").read_text())
    assert info["blur_level"] == 4 and info["sigma"] == pytest.approx(0.4) and not info["blur_is_identity"]


def test_timm_pretrained_cfg_overlay_and_checkpoint_path(tmp_path):
    model = _pretrained(tmp_path / "pre")
    out = export_encoder(tmp_path / "pre", tmp_path / "timm", "timm", sigma=0.7)
    cfg = json.loads((out / "config.json").read_text())
    x, levels, fed = _inputs(model, 7)
    with torch.no_grad():
        ours, _, _ = model.encoder(x, levels)
        for kwargs in (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))),
                       dict(checkpoint_path=str(out / "model.safetensors"))):
            vit = timm.create_model(cfg["architecture"], **kwargs, **cfg["model_args"]).eval()
            assert torch.allclose(vit.forward_features(fed), ours, atol=1e-5)


def test_default_level_is_one_and_needs_no_blur(tmp_path):
    model = _pretrained(tmp_path / "pre")
    out = export_encoder(tmp_path / "pre", tmp_path / "timm")
    info = json.loads((out / "d2mae_export.json").read_text())
    assert info["blur_level"] == 1 and info["sigma"] == pytest.approx(0.1) and info["blur_is_identity"]
    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        ours, _, _ = model.encoder(x, torch.ones(2))
        theirs = vit.forward_features((x - MEAN[0]) / STD[0])  # only normalised: σ_1 = 0.1 blurs nothing
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_blur_level_choices(tmp_path):
    cfg = ModelConfig(**TINY)
    table = tmp_path / "predictions.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "t_star", "sigma_star"])
        writer.writerows([["a", 5, 0.5], ["b", 3, 0.3], ["c", 5, 0.5], ["d", 3, 0.3], ["e", 7, 0.7]])
    assert resolve_blur_level(cfg, obs_table=table) == 3  # most common; a tie goes to the lighter blur
    assert resolve_blur_level(cfg, 9, obs_table=table) == 9
    assert resolve_blur_level(cfg, sigma=1.1) == pytest.approx(11)
    assert resolve_blur_level(cfg) == 1
    assert resolve_blur_level(ModelConfig(**TINY, blur=False)) == 0
    with pytest.raises(D2maeError, match="blur_level: must be in 0..11"):
        resolve_blur_level(cfg, 12)
    with pytest.raises(D2maeError, match="outside the model's blur schedule"):
        resolve_blur_level(cfg, sigma=2.0)
    with pytest.raises(D2maeError, match="both given"):
        resolve_blur_level(cfg, 2, sigma=0.2)
    with pytest.raises(D2maeError, match="pre-trained without blur"):
        resolve_blur_level(ModelConfig(**TINY, blur=False), 3)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na,1\n")
    with pytest.raises(D2maeError, match="no 't_star' column"):
        resolve_blur_level(cfg, obs_table=bad)


def test_refuses_to_overwrite_a_model_folder(tmp_path):
    _pretrained(tmp_path / "pre")
    with pytest.raises(D2maeError, match="pre-trained folder itself"):
        export_encoder(tmp_path / "pre", tmp_path / "pre")
    with pytest.raises(D2maeError, match="unknown value 'onnx'"):
        export_encoder(tmp_path / "pre", tmp_path / "x", "onnx")
    with pytest.raises(D2maeError, match="does not exist"):
        export_encoder(tmp_path / "missing", tmp_path / "x")


def test_cli_export(tmp_path, capsys):
    _pretrained(tmp_path / "pre")
    out = tmp_path / "timm"
    assert main(["export", "--pretrained", str(tmp_path / "pre"), "--format", "timm", "--out", str(out),
                 "--blur-level", "3"]) == 0
    printed = capsys.readouterr().out
    assert "local-dir:" in printed and "σ=0.3" in printed
    assert (out / "export.yaml").is_file() and (out / "model.safetensors").is_file()
    assert main(["export", "--pretrained", str(tmp_path / "pre"), "--out", str(out), "--blur-level", "1",
                 "--sigma", "0.1"]) == 2
    assert "both given" in capsys.readouterr().err
    assert main(["export", "--out", str(out)]) == 2
    assert "option --pretrained: is required" in capsys.readouterr().err


def test_hf_needs_transformers(tmp_path, monkeypatch):
    _pretrained(tmp_path / "pre")
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # as if not installed
    with pytest.raises(D2maeError, match=r"pip install 'd2mae\[hf\]'"):
        export_encoder(tmp_path / "pre", tmp_path / "hf", "hf")


@pytest.mark.parametrize("blur_embed,architecture", [("token", "Dinov2WithRegistersModel"), ("add", "ViTModel"),
                                                     ("none", "ViTModel")])
def test_hf_features_equal_d2mae(tmp_path, blur_embed, architecture):
    transformers = pytest.importorskip("transformers")
    model = _pretrained(tmp_path / "pre", blur_embed)
    out = export_encoder(tmp_path / "pre", tmp_path / "hf", "hf", t=4)
    kwargs = {} if blur_embed == "token" else {"add_pooling_layer": False}
    hf, info = transformers.AutoModel.from_pretrained(str(out), output_loading_info=True, **kwargs)
    assert type(hf).__name__ == architecture
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x, levels, fed = _inputs(model, 4)
    with torch.no_grad():
        ours, _, _ = model.encoder(x, levels)
        theirs = hf.eval()(pixel_values=fed).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)
    processor = transformers.AutoImageProcessor.from_pretrained(str(out))
    assert list(processor.image_mean) == pytest.approx(MEAN) and list(processor.image_std) == pytest.approx(STD)
