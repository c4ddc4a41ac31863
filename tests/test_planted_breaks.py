"""Paper and baseline properties checked against independent facts (a formula, scipy, a known image), so that each
planted break of ``benchmarks/mutations.py`` fails one of them: MoCo v3's momentum encoder and predictor, DiffMAE's
clean-patch target, the classifier's blur at σ_{t*}, and sharp views of an image that needs no resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from d2mae.data.cache import DecodedCache
from d2mae.data.dataset import ImageDataset
from d2mae.eval.infer import decode_views
from d2mae.method.diffmae import DiffMAE
from d2mae.method.moco import MoCoV3
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurClassifier, DeblurMAE
from tests.conftest import TINY

MOCO = dict(TINY, objective="moco-v3", blur=False, blur_embed="none", moco_dim=8, moco_mlp_dim=16)
DIFFMAE = dict(TINY, objective="diffmae", blur=False, blur_embed="none", loss_on="masked", diffusion_steps=50)


def _views(b: int = 4, s: int = 32) -> torch.Tensor:
    return torch.rand(b, 2, 1, s, s, generator=torch.Generator().manual_seed(1))  # [B, 2, C, S, S]


def _params(model: torch.nn.Module, b: int, seed: int) -> dict[str, torch.Tensor]:
    return model.draw(torch.Generator().manual_seed(seed), b)


def test_moco_momentum_encoder_follows_the_ema_formula_over_k_loss_steps() -> None:
    """MoCo v3: after k optimizer steps of the loss, the key encoder equals θ_k ← m·θ_k + (1 − m)·θ_q applied k
    times, θ_q being the online encoder at each step's forward; the keys therefore move."""
    model = MoCoV3(ModelConfig(**MOCO))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    m = 0.9
    online = [p for p in model.encoder.parameters()]
    keys = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    start = [k.clone() for k in keys]
    for step in range(3):
        theta_q = [p.detach().clone() for p in online]
        loss, _, _ = model(_views(), momentum=m, **_params(model, 4, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        keys = [m * k + (1 - m) * q for k, q in zip(keys, theta_q)]
    got = list(model.momentum_encoder.parameters())
    assert max(float((g - k).abs().max()) for g, k in zip(got, keys)) < 1e-6
    assert max(float((g - s).abs().max()) for g, s in zip(got, start)) > 1e-4  # the keys moved


def test_moco_predictor_gets_gradients_and_shapes_the_loss() -> None:
    """MoCo v3's queries of both views go through the predictor: its weights get gradients, and changing them
    changes the loss."""
    model = MoCoV3(ModelConfig(**MOCO))
    x, params = _views(), _params(model, 4, 0)
    calls = []
    hook = model.predictor.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    loss, _, _ = model(x, momentum=1.0, **params)
    hook.remove()
    assert calls == [4, 4]  # the queries of both views
    loss.backward()
    grads = [p.grad for p in model.predictor.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        for p in model.predictor.parameters():
            p.mul_(1.5)
        changed, _, _ = model(x, momentum=1.0, **params)
    assert abs(float(changed) - float(loss)) > 1e-6


def test_diffmae_target_is_the_clean_masked_patches() -> None:
    """DiffMAE denoises toward x₀: a decoder that returns the clean (normalised) pixels of the masked patches, found
    here by unfolding the image, has loss 0; the noisy x_t or the noise ε would not."""
    cfg = ModelConfig(**DIFFMAE)
    model = DiffMAE(cfg)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    drawn = _params(model, 3, 0)
    p, n = cfg.patch_size, cfg.num_patches
    xn = (x - model.encoder.pixel_mean) / model.encoder.pixel_std
    patches = torch.nn.functional.unfold(xn, kernel_size=p, stride=p).transpose(1, 2)  # [B, N, p*p] row by row
    masked = torch.argsort(drawn["noise"], dim=1)[:, int(n * (1 - cfg.mask_ratio)):]  # [B, M]
    clean = torch.gather(patches, 1, masked[..., None].expand(-1, -1, p * p))  # [B, M, P]
    model.decoder_pred.register_forward_hook(lambda mod, inp, out: clean)
    loss, pred, _ = model(x, **drawn)
    assert float(loss) < 1e-10


@pytest.mark.parametrize("levels", [(1.0, 5.0, 11.0), (3.0, 11.0, 7.0)])
def test_the_classifier_encoder_sees_the_image_blurred_at_sigma_t_star(levels: tuple[float, ...]) -> None:
    """Algorithm 1 line 11: the classifier's encoder sees each image blurred at its own σ_{t*} — equal, per sample,
    to scipy's gaussian_filter of the input at σ = 0.1·t* (reflect border, truncate 4)."""
    cfg = ModelConfig(**TINY)
    clf = DeblurClassifier(cfg, 2)
    x = torch.rand(len(levels), 1, 32, 32, generator=torch.Generator().manual_seed(3))
    seen = []
    clf.encoder.patch_embed.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))
    clf(x, torch.tensor(levels))
    image = seen[0] * clf.encoder.pixel_std + clf.encoder.pixel_mean  # [B, C, S, S] back in [0, 1]
    for i, t in enumerate(levels):
        want = gaussian_filter(x[i, 0].double().numpy(), sigma=0.1 * t, mode="reflect", truncate=4.0)
        assert np.abs(image[i, 0].double().numpy() - want).max() < 1e-5, t


def test_the_image_is_blurred_whole_before_patches_are_masked() -> None:
    """Eq. 1 then masking: under 75% masking the patch embedding still sees the whole image blurred at σ_t (scipy's
    gaussian_filter of the full input), so no masked patch leaks into its visible neighbours through the blur."""
    cfg = ModelConfig(**TINY)
    model = DeblurMAE(cfg)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    noise = torch.rand(2, cfg.num_patches, generator=torch.Generator().manual_seed(5))
    seen = []
    model.encoder.patch_embed.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))
    model(x, torch.tensor([4.0, 11.0]), noise=noise)
    image = seen[0] * model.encoder.pixel_std + model.encoder.pixel_mean
    for i, t in enumerate((4.0, 11.0)):
        want = gaussian_filter(x[i, 0].double().numpy(), sigma=0.1 * t, mode="reflect", truncate=4.0)
        assert np.abs(image[i, 0].double().numpy() - want).max() < 1e-5


@pytest.fixture
def edges(tmp_path):
    """A 32 × 32 PNG of 4-pixel stripes 0/255: a file at the model's size, so no view needs resampling."""
    a = np.zeros((32, 32), dtype=np.uint8)
    a[:, (np.arange(32) // 4) % 2 == 1] = 255
    a[:8] = 255 - a[:8]
    path = tmp_path / "edges.png"
    Image.fromarray(a).save(path)
    return str(path), a.astype(np.float32) / 255.0


def _same_or_flipped(view: np.ndarray, truth: np.ndarray) -> float:
    return min(np.abs(view - truth).max(), np.abs(view - truth[:, ::-1]).max())


def test_sharp_views_of_an_image_at_the_model_size_are_its_pixels(edges) -> None:
    """Every data path hands the model the file's own pixels when nothing needs resampling: the fine-tuning and
    OBS view, the loader's and the memory cache's full-image pre-training crops (flipped or not)."""
    path, truth = edges
    assert np.abs(ImageDataset([path], 32, 1, augment="none")[0][0][0].numpy() - truth).max() < 1e-6
    obs = decode_views([path], 32, 1)
    assert obs is not None and np.abs(obs[0, 0].numpy() - truth).max() < 1e-6
    torch.manual_seed(0)
    loader = ImageDataset([path], 32, 1, augment="mae", crop_scale=(1.0, 1.0))
    for _ in range(4):
        assert _same_or_flipped(loader[0][0][0].numpy(), truth) < 1e-6
    cache = DecodedCache([path], 32, 1)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        crop = cache.batch(torch.tensor([0]), generator=g, scale=(1.0, 1.0))
        assert _same_or_flipped(crop[0, 0].numpy(), truth) < 1e-5
