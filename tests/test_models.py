"""DeblurMAE and the classifier read like the paper's claims (Section 2.2, Eqs. 2-3; Table 3b)."""

from __future__ import annotations

import pytest
import torch

from d2mae.artifacts import load_pretrained, save_pretrained
from d2mae.errors import D2maeError
from d2mae.models import DeblurClassifier, DeblurMAE, ModelConfig
from tests.conftest import TINY


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_token_mode_adds_exactly_d_parameters():
    base = {**TINY, "embed_dim": 64}
    n_token = _params(DeblurMAE(ModelConfig(**base, blur_embed="token")))
    n_none = _params(DeblurMAE(ModelConfig(**base, blur_embed="none")))
    n_add = _params(DeblurMAE(ModelConfig(**base, blur_embed="add")))
    assert n_token - n_none == 64
    assert n_add == n_none


def test_vit_base_blur_token_is_768_parameters():
    cfg = ModelConfig(model="vit_base_patch16", blur_embed="token", decoder_depth=1)
    enc = DeblurMAE(cfg).encoder
    assert enc.blur_token.numel() == 768
    assert enc.pos_embed.shape == (1, 196 + 2, 768)  # P covers N + 2 tokens (Eq. 2)


def test_blur_token_sits_after_cls_and_changes_the_output(tiny_config):
    model = DeblurMAE(tiny_config).eval()
    x = torch.rand(2, 1, 32, 32)
    captured = {}

    def hook(_module, inputs):
        captured["z"] = inputs[0].detach().clone()

    handle = model.encoder.blocks[0].register_forward_pre_hook(hook)
    t = torch.tensor([3.0, 3.0])
    with torch.no_grad():
        model.encoder(x, t, 0.0)
    handle.remove()
    z = captured["z"]  # [B, 2 + N, D]
    enc = model.encoder
    expected_blu = enc.blur_token[0, 0] + enc.blur_embedding(t)[0] + enc.pos_embed[0, 1]
    assert torch.allclose(z[0, 1], expected_blu, atol=1e-6)
    assert torch.allclose(z[0, 0], enc.cls_token[0, 0] + enc.pos_embed[0, 0], atol=1e-6)
    with torch.no_grad():
        a = model.deblur_loss(x, torch.tensor([3.0, 3.0]))
        # same blurred input, different condition t: only BLU(t) differs
        latent, _, ids = enc(x, torch.tensor([3.0, 3.0]), 0.0)
        enc_blur = enc.blur
        enc.blur = lambda img, t: enc_blur(img, torch.full_like(t, 3.0))
        latent_b, _, _ = enc(x, torch.tensor([9.0, 9.0]), 0.0)
        enc.blur = enc_blur
    assert not torch.allclose(latent, latent_b, atol=1e-4)
    assert torch.isfinite(a).all()


def test_add_mode_adds_the_sinusoid_to_every_patch():
    cfg = ModelConfig(**{**TINY, "blur_embed": "add"})
    model = DeblurMAE(cfg).eval()
    assert model.encoder.num_prefix_tokens == 1 and model.encoder.blur_token is None
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        a, _, _ = model.encoder(x, torch.tensor([2.0]), 0.0)
    assert a.shape == (1, 1 + 4, 64)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.0])
def test_masking_keeps_exactly_the_requested_share(tiny_config, ratio):
    cfg = ModelConfig(**{**TINY, "img_size": 64})  # N = 16
    model = DeblurMAE(cfg)
    loss, pred, mask = model(torch.rand(3, 1, 64, 64), mask_ratio=ratio)
    assert pred.shape == (3, 16, 256)  # the full image is predicted
    assert torch.all(mask.sum(1) == int(16 * ratio))


def test_loss_target_is_the_unblurred_image(tiny_config):
    model = DeblurMAE(tiny_config)
    x = torch.rand(2, 1, 32, 32)
    target = model.target(x)
    assert torch.allclose(model.unpatchify(target), model.encoder.normalize(x), atol=1e-6)
    # a perfect prediction of the original gives zero loss even though the input was blurred
    assert torch.allclose(model.loss_per_sample(x, target), torch.zeros(2), atol=1e-10)
    blurred_target = model.patchify(model.encoder.blur(x, torch.tensor([11.0, 11.0])))
    assert (model.loss_per_sample(x, blurred_target) > 0).all()


def test_masked_loss_only_counts_masked_patches(tiny_config):
    model = DeblurMAE(ModelConfig(**{**TINY, "loss_on": "masked"}))
    x = torch.rand(2, 1, 32, 32)
    pred = model.target(x).clone()
    mask = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]])
    pred[0, 1] += 5  # error on a visible patch does not count
    assert torch.allclose(model.loss_per_sample(x, pred, mask), torch.zeros(2), atol=1e-10)


def test_patchify_round_trip(tiny_config):
    model = DeblurMAE(ModelConfig(**{**TINY, "in_chans": 3}))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def test_classifier_receives_t_and_reuses_the_encoder(tiny_config):
    mae = DeblurMAE(tiny_config)
    clf = DeblurClassifier(tiny_config, num_classes=3).eval()
    clf.load_encoder(mae.state_dict())
    assert torch.equal(clf.encoder.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)
    torch.nn.init.normal_(clf.head.weight)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        a = clf(x, torch.tensor([1.0, 1.0]))
        b = clf(x, torch.tensor([7.0, 7.0]))
    assert a.shape == (2, 3)
    assert not torch.allclose(a, b, atol=1e-5)


def test_weights_round_trip_through_safetensors(tmp_path, tiny_config):
    model = DeblurMAE(tiny_config)
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert loaded.config == tiny_config


def test_mismatched_weights_are_refused(tmp_path, tiny_config):
    save_pretrained(DeblurMAE(tiny_config), tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json")
    cfg.write_text(cfg.read_text().replace('"depth": 2', '"depth": 3'))
    with pytest.raises(D2maeError, match="do not match"):
        load_pretrained(tmp_path / "m")


def test_newer_format_is_refused(tmp_path, tiny_config):
    save_pretrained(DeblurMAE(tiny_config), tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json")
    cfg.write_text(cfg.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(D2maeError, match="not supported"):
        load_pretrained(tmp_path / "m")


@pytest.mark.parametrize("kwargs,match", [
    (dict(model="vit_huge"), "unknown model"),
    (dict(img_size=40), "multiple of the patch"),
    (dict(img_size=8), "multiple of the patch"),
    (dict(blur_embed="concat"), "blur-embed"),
    (dict(sigma_start=0.0), "sigma-start"),
    (dict(sigma_start=1.2, sigma_stop=1.1), "sigma-stop"),
    (dict(in_chans=2), "in-chans"),
    (dict(mask_ratio=1.0), "mask-ratio"),
])
def test_bad_model_options_are_refused(kwargs, match):
    with pytest.raises(D2maeError, match=match):
        ModelConfig(**{**TINY, **kwargs})
