"""DeblurMAE and the classifier read like the paper's claims (Section 2.2, Eqs. 2-3; Table 3b)."""

from __future__ import annotations

import pytest
import torch

from d2mae.io.artifacts import load_pretrained, save_pretrained
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurClassifier, DeblurMAE
from d2mae.runtime.errors import D2maeError
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
    cfg = ModelConfig(arch="vit_base_patch16", blur_embed="token", decoder_depth=1)
    enc = DeblurMAE(cfg).encoder
    assert enc.blur_token.numel() == 768
    assert enc.pos_embed.shape == (1, 196 + 2, 768)  # P covers N + 2 tokens (Eq. 2)


def _block_input(model: DeblurMAE, x: torch.Tensor, t: torch.Tensor, ratio: float, noise=None):
    """The sequence z_0 that enters the first encoder block [B, L, D], and the encoder's mask and ids_restore."""
    captured = {}
    handle = model.encoder.blocks[0].register_forward_pre_hook(
        lambda _m, inputs: captured.setdefault("z", inputs[0].detach().clone()))
    with torch.no_grad():
        _, mask, ids_restore = model.encoder(x, t, ratio, noise)
    handle.remove()
    return captured["z"], mask, ids_restore


def _kept(noise: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the patches the encoder keeps [B, N_keep]: the smallest noise (random_masking); all, in order,
    without masking."""
    if ratio == 0:
        return torch.arange(noise.shape[1]).expand(noise.shape[0], -1)
    return torch.argsort(noise, dim=1)[:, :int(noise.shape[1] * (1 - ratio))]


def _patch_tokens(model: DeblurMAE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E_i + P_i of every patch of x blurred at σ_t [B, N, D], computed here from the parts (no encoder.forward)."""
    enc = model.encoder
    with torch.no_grad():
        return enc.patch_embed(enc.blur(x, t)) + enc.pos_embed[:, enc.num_prefix_tokens:]


@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_blur_token_sits_after_cls_and_changes_the_output(tiny_config, ratio):
    """Eq. 2: z_0 = [CLS, BLU(t), E_1 … E_N] + P, with BLU(t) = b + sin-emb(t), also under 75% masking."""
    model = DeblurMAE(tiny_config).eval()
    enc = model.encoder
    x = torch.rand(3, 1, 32, 32)
    t = torch.tensor([3.0, 7.0, 11.0])
    noise = torch.rand(3, 4)
    z, mask, _ = _block_input(model, x, t, ratio, noise)
    keep = int(4 * (1 - ratio))
    assert z.shape == (3, 2 + keep, 64)  # CLS, BLU(t), the kept patches
    for b in range(3):
        assert torch.allclose(z[b, 0], enc.cls_token[0, 0] + enc.pos_embed[0, 0], atol=1e-6)
        blu = enc.blur_token[0, 0] + enc.blur_embedding(t)[b] + enc.pos_embed[0, 1]
        assert torch.allclose(z[b, 1], blu, atol=1e-6)
    kept = _kept(noise, ratio)
    tokens = _patch_tokens(model, x, t)
    assert torch.allclose(z[:, 2:], torch.gather(tokens, 1, kept[..., None].expand(-1, -1, 64)), atol=1e-5)
    # the same blurred pixels with another condition t change the encoding: only BLU(t) differs
    with torch.no_grad():
        enc_blur = enc.blur
        enc.blur = lambda img, _t: enc_blur(img, t)
        latent_b, _, _ = enc(x, torch.tensor([1.0, 1.0, 1.0]), ratio, noise)
        enc.blur = enc_blur
        latent, _, _ = enc(x, t, ratio, noise)
    assert not torch.allclose(latent, latent_b, atol=1e-4)


@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_add_mode_adds_the_sinusoid_to_every_patch(ratio):
    """Table 3b "Addition": sin-emb(t) is added to every (kept) patch embedding; no extra token, CLS untouched."""
    cfg = ModelConfig(**{**TINY, "blur_embed": "add"})
    model = DeblurMAE(cfg).eval()
    enc = model.encoder
    assert enc.num_prefix_tokens == 1 and enc.blur_token is None
    x = torch.rand(2, 1, 32, 32)
    t = torch.tensor([2.0, 9.0])
    noise = torch.rand(2, 4)
    z, _, _ = _block_input(model, x, t, ratio, noise)
    keep = int(4 * (1 - ratio))
    assert z.shape == (2, 1 + keep, 64)
    assert torch.allclose(z[:, 0], enc.cls_token[0] + enc.pos_embed[0, :1], atol=1e-6)
    kept = _kept(noise, ratio)
    tokens = torch.gather(_patch_tokens(model, x, t), 1, kept[..., None].expand(-1, -1, 64))  # [B, keep, D]
    added = z[:, 1:] - tokens
    assert torch.allclose(added, enc.blur_embedding(t)[:, None].expand_as(added), atol=1e-5)


def test_none_mode_adds_nothing():
    model = DeblurMAE(ModelConfig(**{**TINY, "blur_embed": "none"})).eval()
    x, t = torch.rand(2, 1, 32, 32), torch.tensor([2.0, 9.0])
    z, _, _ = _block_input(model, x, t, 0.0)
    assert torch.allclose(z[:, 1:], _patch_tokens(model, x, t), atol=1e-6)


def test_encoder_sees_the_image_blurred_at_sigma_t(tiny_config):
    """Eq. 1: the encoder's patch embedding receives G_{σ_t}(x), each sample at its own σ_t (scipy reference)."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    model = DeblurMAE(tiny_config).eval()
    enc = model.encoder
    captured = {}
    handle = enc.patch_embed.register_forward_pre_hook(lambda _m, inputs: captured.setdefault("x", inputs[0]))
    x = torch.rand(3, 1, 32, 32)
    t = torch.tensor([1.0, 6.0, 11.0])
    with torch.no_grad():
        enc(x, t, 0.75)
    handle.remove()
    seen = captured["x"] * enc.pixel_std + enc.pixel_mean  # undo the normalisation
    for b, sigma in enumerate((0.1, 0.6, 1.1)):
        ref = gaussian_filter(x[b, 0].double().numpy(), sigma, mode="reflect", truncate=4.0)
        assert np.abs(seen[b, 0].numpy() - ref).max() < 1e-5


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
    """MAE's loss: the mean squared error over the masked patches only (visible patches do not count)."""
    model = DeblurMAE(ModelConfig(**{**TINY, "loss_on": "masked"}))
    x = torch.rand(2, 1, 32, 32)
    pred = model.target(x).clone()  # [B, N, p*p*C], exact on every patch
    mask = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]])
    pred[0, 0] += 0.5  # masked: counts, per-patch MSE 0.25
    pred[0, 1] += 5.0  # visible: does not count
    pred[1, 1] += 0.3  # masked: 0.09, averaged with the other masked patch's 0
    pred[1, 3] += 7.0  # visible
    torch.testing.assert_close(model.loss_per_sample(x, pred, mask), torch.tensor([0.25, 0.045]))
    torch.testing.assert_close(model.loss_per_sample(x, pred), torch.tensor([(0.25 + 25) / 4, (0.09 + 49) / 4]))


def test_pretraining_loss_is_against_the_original_image(tiny_config):
    """Eq. 3: a decoder that returns the original, un-blurred image exactly has zero loss, whatever σ_t the input
    was blurred with and on every patch; one that returns its blurred input does not."""
    model = DeblurMAE(tiny_config)
    x = torch.rand(2, 1, 32, 32)
    t = torch.tensor([11.0, 6.0])
    original = model.patchify(model.encoder.normalize(x))
    blurred = model.patchify(model.encoder.blur(x, t))
    model.forward_decoder = lambda latent, ids_restore: original
    loss, _, _ = model(x, t, mask_ratio=0.75)
    assert float(loss) == pytest.approx(0.0, abs=1e-10)
    model.forward_decoder = lambda latent, ids_restore: blurred
    loss, _, _ = model(x, t, mask_ratio=0.75)
    assert float(loss) > 1e-3


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


@pytest.mark.parametrize("kwargs,option,match", [
    (dict(arch="vit_huge"), "arch", "unknown value 'vit_huge'"),
    (dict(img_size=40), "img_size", "multiple of the patch"),
    (dict(img_size=8), "img_size", "multiple of the patch"),
    (dict(blur_embed="concat"), "blur_embed", "unknown value 'concat'"),
    (dict(sigma_start=0.0), "sigma_start", "must be a number > 0"),
    (dict(sigma_start=1.2, sigma_stop=1.1), "sigma_stop", "must not be below"),
    (dict(in_chans=2), "in_chans", "use one of 1, 3"),
    (dict(mask_ratio=1.0), "mask_ratio", r"in \[0, 1\)"),
    (dict(patch_size=0), "patch_size", "an integer ≥ 1, got 0"),
    (dict(depth=0), "depth", "an integer ≥ 1, got 0"),
    (dict(embed_dim=0), "embed_dim", "an integer ≥ 4, got 0"),
    (dict(decoder_embed_dim=0), "decoder_embed_dim", "an integer ≥ 4, got 0"),
    (dict(decoder_num_heads=0), "decoder_num_heads", "an integer ≥ 1, got 0"),
    (dict(decoder_embed_dim=-8), "decoder_embed_dim", "got -8"),
    (dict(decoder_embed_dim=36, decoder_num_heads=5), "decoder_num_heads", "divisible by its heads"),
    (dict(std=[0.0]), "std", r"in \(0, 1\], got 0.0"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio", "got nan"),
])
def test_bad_model_options_are_refused(kwargs, option, match):
    """Each field's domain is checked in one place (its metadata), in domain words, naming the option."""
    with pytest.raises(D2maeError, match=match) as caught:
        ModelConfig(**{**TINY, **kwargs})
    assert caught.value.option == option
