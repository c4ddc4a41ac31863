"""Initialising D²MAE from MAE / timm weights: every key placed, the blur token's position added (Eq. 2), sizes and
channels adapted, and pickled code refused without running it."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from d2mae.io.artifacts import save_pretrained
from d2mae.io.imports import init_from_checkpoint, load_checkpoint_file
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurClassifier, DeblurMAE, sincos_pos_embed_2d
from d2mae.runtime.errors import D2maeError
from tests.conftest import TINY

NEW = ["encoder.blur_token", "encoder.pixel_mean", "encoder.pixel_std"]


def official_mae_state(dim: int = 768, depth: int = 12, ddim: int = 512, ddepth: int = 8, patch: int = 16,
                       chans: int = 3, grid: int = 14) -> dict[str, torch.Tensor]:
    """Key names and shapes of the official ``mae_pretrain_vit_base.pth`` / ``mae_visualize_vit_base.pth``
    (models_mae.py of the MAE release), written out by hand, with random values."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    def block(prefix: str, d: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.norm1.weight": 1 + r(d), f"{prefix}.norm1.bias": r(d),
                f"{prefix}.attn.qkv.weight": r(3 * d, d), f"{prefix}.attn.qkv.bias": r(3 * d),
                f"{prefix}.attn.proj.weight": r(d, d), f"{prefix}.attn.proj.bias": r(d),
                f"{prefix}.norm2.weight": 1 + r(d), f"{prefix}.norm2.bias": r(d),
                f"{prefix}.mlp.fc1.weight": r(4 * d, d), f"{prefix}.mlp.fc1.bias": r(4 * d),
                f"{prefix}.mlp.fc2.weight": r(d, 4 * d), f"{prefix}.mlp.fc2.bias": r(d)}

    state = {"cls_token": r(1, 1, dim), "pos_embed": torch.randn(1, 1 + grid * grid, dim, generator=g),
             "patch_embed.proj.weight": r(dim, chans, patch, patch), "patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        state.update(block(f"blocks.{i}", dim))
    state.update({"norm.weight": 1 + r(dim), "norm.bias": r(dim), "mask_token": r(1, 1, ddim),
                  "decoder_embed.weight": r(ddim, dim), "decoder_embed.bias": r(ddim),
                  "decoder_pos_embed": torch.randn(1, 1 + grid * grid, ddim, generator=g)})
    for i in range(ddepth):
        state.update(block(f"decoder_blocks.{i}", ddim))
    state.update({"decoder_norm.weight": 1 + r(ddim), "decoder_norm.bias": r(ddim),
                  "decoder_pred.weight": r(patch * patch * chans, ddim), "decoder_pred.bias": r(patch * patch * chans)})
    return state


@pytest.fixture(scope="module")
def mae_vit_b(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = official_mae_state()
    path = tmp_path_factory.mktemp("mae") / "mae_pretrain_vit_base.pth"
    torch.save({"model": state}, path)
    return path, state


def _tiny_timm(chans: int = 3, depth: int = 2) -> torch.nn.Module:
    """A real timm ViT (timm's own names, as in ``vit_base_patch16_224.mae``), tiny."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=64, depth=depth, num_heads=2,
                              num_classes=0, in_chans=chans).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
        model.cls_token.normal_()
        model.patch_embed.proj.bias.normal_()
    return model


def test_official_mae_vit_b_loads_with_every_key_used(mae_vit_b):
    path, state = mae_vit_b
    model = DeblurMAE(ModelConfig(arch="vit_base_patch16", in_chans=3))
    blur_token = model.encoder.blur_token.detach().clone()
    report = init_from_checkpoint(model, path)
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.new) == NEW
    assert len(report.loaded) == len(state)
    sd = model.state_dict()
    assert torch.equal(sd["encoder.blocks.11.attn.qkv.weight"], state["blocks.11.attn.qkv.weight"])
    assert torch.equal(sd["decoder_blocks.7.mlp.fc2.weight"], state["decoder_blocks.7.mlp.fc2.weight"])
    assert torch.equal(sd["decoder_pred.weight"], state["decoder_pred.weight"])
    assert torch.equal(sd["mask_token"], state["mask_token"])
    for name in ("encoder.pos_embed", "decoder_pos_embed"):  # N + 1 → N + 2 positions (Eq. 2)
        src = state[name.removeprefix("encoder.")]
        assert sd[name].shape == (1, 196 + 2, src.shape[-1])
        assert torch.equal(sd[name][:, :1], src[:, :1])  # CLS
        assert torch.count_nonzero(sd[name][:, 1]) == 0  # BLU(t): zero, like the sin-cos prefix rows
        assert torch.equal(sd[name][:, 2:], src[:, 1:])
    assert torch.equal(model.encoder.blur_token, blur_token)  # the new token keeps its initial value
    assert any("blur token" in note for note in report.converted)


def test_official_mae_vit_b_at_160_and_one_channel(mae_vit_b):
    path, state = mae_vit_b
    model = DeblurMAE(ModelConfig(arch="vit_base_patch16", in_chans=1, img_size=160))
    report = init_from_checkpoint(model, path)
    assert report.missing == [] and report.unexpected == []
    sd = model.state_dict()
    # 3 → 1 channel: the RGB filters summed (timm adapt_input_conv), the RGB predictions averaged per pixel
    assert torch.allclose(sd["encoder.patch_embed.proj.weight"], state["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert sd["decoder_pred.weight"].shape == (256, 512)
    assert torch.allclose(sd["decoder_pred.weight"], state["decoder_pred.weight"].view(256, 3, 512).mean(1))
    assert torch.allclose(sd["decoder_pred.bias"], state["decoder_pred.bias"].view(256, 3).mean(1))
    # 14×14 → 10×10: a learned (non sin-cos) grid is resampled with timm
    want = resample_abs_pos_embed(state["pos_embed"], new_size=[10, 10], num_prefix_tokens=1)
    assert sd["encoder.pos_embed"].shape == (1, 100 + 2, 768)
    assert torch.allclose(sd["encoder.pos_embed"][:, 2:], want[:, 1:])
    assert torch.count_nonzero(sd["encoder.pos_embed"][:, 1]) == 0
    assert any("resampled 14×14 → 10×10" in note for note in report.converted)
    latent, _, _ = model.encoder(torch.rand(1, 1, 160, 160), torch.ones(1))
    assert latent.shape == (1, 102, 768) and torch.isfinite(latent).all()


def test_timm_mae_weights_give_the_same_features(tmp_path):
    """timm layout (safetensors): at blur level 0 with identity normalisation, the d2mae encoder is timm's ViT."""
    vit = _tiny_timm()
    path = tmp_path / "model.safetensors"
    save_file(vit.state_dict(), str(path))
    x = torch.rand(2, 3, 32, 32)
    for chans in (3, 1):
        cfg = ModelConfig(**{**TINY, "blur_embed": "none", "in_chans": chans, "mean": [0.0] * chans,
                             "std": [1.0] * chans})
        model = DeblurMAE(cfg).eval()
        report = init_from_checkpoint(model, path)
        assert report.unexpected == [] and not [k for k in report.missing if k.startswith("encoder.")]
        assert "decoder_pred.weight" in report.missing  # encoder-only weights: the decoder keeps its init
        with torch.no_grad():
            ours, _, _ = model.encoder(x[:, :chans], torch.zeros(2))
            # one gray channel through the summed filters = the gray image repeated on R, G and B
            theirs = vit.forward_features(x[:, :1].expand(-1, 3, -1, -1) if chans == 1 else x)
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_classifier_from_timm_weights_and_sincos_regenerated(tmp_path):
    vit = _tiny_timm()
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos_embed_2d(64, 2, 1))  # MAE's fixed embedding
    path = tmp_path / "mae.safetensors"
    save_file(vit.state_dict(), str(path))
    clf = DeblurClassifier(ModelConfig(**{**TINY, "img_size": 64}), num_classes=2)
    report = init_from_checkpoint(clf, path)
    assert report.missing == [] and report.unexpected == ["norm.bias", "norm.weight"]  # global pooling: fc_norm
    assert any("norm.weight: not used" in note for note in report.converted)
    assert torch.allclose(clf.encoder.pos_embed, sincos_pos_embed_2d(64, 4, 2), atol=1e-6)  # exact 4×4 grid
    assert any("sin-cos grid regenerated" in note for note in report.converted)


def test_d2mae_state_moves_to_another_size(tmp_path):
    src = DeblurMAE(ModelConfig(**TINY))
    save_pretrained(src, tmp_path / "pre")
    dst = DeblurMAE(ModelConfig(**{**TINY, "img_size": 48}))
    report = init_from_checkpoint(dst, tmp_path / "pre")  # a folder: its model.safetensors
    assert report.missing == [] and report.new == ["encoder.pixel_mean", "encoder.pixel_std"]
    assert torch.equal(dst.encoder.blur_token, src.encoder.blur_token)
    assert torch.allclose(dst.encoder.pos_embed, sincos_pos_embed_2d(64, 3, 2), atol=1e-6)


def test_encoder_mismatch_is_refused_unless_not_strict(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tiny_timm(depth=2).state_dict(), str(path))
    deeper = DeblurMAE(ModelConfig(**{**TINY, "depth": 3}))
    with pytest.raises(D2maeError, match="does not fit this model's encoder.*blocks.2"):
        init_from_checkpoint(deeper, path)
    report = init_from_checkpoint(deeper, path, strict_encoder=False)
    assert "encoder.blocks.2.attn.qkv.weight" in report.missing
    wider = DeblurMAE(ModelConfig(**{**TINY, "embed_dim": 128}))
    with pytest.raises(D2maeError, match="does not fit"):
        init_from_checkpoint(wider, path)


def test_a_decoder_that_does_not_fit_is_skipped_whole(tmp_path):
    state = official_mae_state(dim=64, depth=2, ddim=48, ddepth=1, grid=2)
    path = tmp_path / "mae.pth"
    torch.save({"model": state}, path)
    model = DeblurMAE(ModelConfig(**TINY))  # decoder width 32, not 48
    before = model.decoder_embed.weight.detach().clone()
    report = init_from_checkpoint(model, path)
    assert torch.equal(model.decoder_embed.weight, before)
    assert "decoder_embed.weight" in report.unexpected and "decoder_embed.weight" in report.missing
    assert any(note.startswith("decoder not loaded") for note in report.converted)
    assert not [k for k in report.missing if k.startswith("encoder.")]


class _RunsCode:
    """A pickle payload that writes a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran.txt"
    weights = {"cls_token": torch.zeros(1, 1, 64)}
    zip_file = tmp_path / "evil.pth"
    torch.save({"model": weights, "payload": _RunsCode(marker)}, zip_file)
    legacy = tmp_path / "evil_legacy.pth"
    legacy.write_bytes(pickle.dumps({"model": weights, "payload": _RunsCode(marker)}, protocol=2))
    namespace = tmp_path / "with_args.pth"  # MAE's training checkpoints also store argparse's Namespace
    torch.save({"model": weights, "args": argparse.Namespace(lr=1.0)}, namespace)
    model = DeblurMAE(ModelConfig(**TINY))
    for path in (zip_file, legacy, namespace):
        with pytest.raises(D2maeError, match="pickled Python objects"):
            init_from_checkpoint(model, path)
    assert not marker.exists()


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(D2maeError, match="does not exist"):
        load_checkpoint_file(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(D2maeError, match="junk.pth"):
        load_checkpoint_file(junk)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(D2maeError, match="no state dict|no tensors"):
        load_checkpoint_file(empty)
    (tmp_path / "folder").mkdir()
    with pytest.raises(D2maeError, match="no .safetensors or .pth"):
        load_checkpoint_file(tmp_path / "folder")


def test_pretrain_cli_starts_from_official_mae_weights(tmp_path, capsys):
    """``d2mae pretrain --init-from mae.pth``: the RGB MAE checkpoint converted (1 channel, blur token added), the
    report beside the outputs; a resume must keep the same start weights."""
    import json

    from d2mae.commands import main as cli
    from d2mae.io.artifacts import load_pretrained
    from tests.test_pretrain import write_images

    state = official_mae_state(dim=64, depth=2, ddim=32, ddepth=1, grid=2)
    ckpt = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state}, ckpt)
    images = write_images(tmp_path / "images", 8)
    arch = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    out = tmp_path / "run"
    flags = ["pretrain", "--data", str(images), "--out", str(out), *arch, "--in-chans", "1", "--batch-size", "4",
             "--epochs", "1", "--lr", "1e-9", "--warmup-epochs", "0", "--init-from", str(ckpt)]
    assert cli.main(flags) == 0
    report = json.loads((out / "init_report.json").read_text())
    assert report["missing"] == [] and report["unexpected"] == []
    assert "initialised from" in capsys.readouterr().err
    model = load_pretrained(out)
    assert torch.allclose(model.encoder.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"], atol=1e-6)
    gray = state["patch_embed.proj.weight"].sum(1, keepdim=True)  # 3 → 1 channel as timm's adapt_input_conv
    assert torch.allclose(model.encoder.patch_embed.proj.weight, gray, atol=1e-6)
    assert cli.main([*flags[:-1], str(tmp_path / "other.pth"), "--resume", "--epochs", "2"]) == 2
    assert "init_from" in capsys.readouterr().err
