"""The blur schedule and the batched per-sample Gaussian blur (paper Eq. 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from d2mae.method.blur import BlurSchedule, blur_matrix, gaussian_blur, sinusoidal_embedding
from d2mae.runtime.errors import D2maeError


def test_default_schedule_is_the_papers():
    s = BlurSchedule()
    assert s.num_levels == 11
    assert s.sigmas == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]
    assert s.search_levels(2) == [1, 3, 5, 7, 9, 11]
    assert s.search_levels(1) == list(range(1, 12))
    assert s.search_levels(3) == [1, 4, 7, 10]


@pytest.mark.parametrize("stop,levels", [(0.6, 6), (1.1, 11), (1.6, 16)])
def test_table3a_ranges(stop, levels):
    s = BlurSchedule(0.1, stop, 0.1)
    assert s.num_levels == levels
    assert s.sigmas[-1] == pytest.approx(stop)


def test_fixed_sigma_and_disabled():
    fixed = BlurSchedule(1.1, 1.1, 0.1)
    assert fixed.num_levels == 1 and fixed.sigmas == [0.0, 1.1]
    assert torch.all(fixed.sample(50) == 1)
    off = BlurSchedule(enabled=False)
    assert off.num_levels == 0 and torch.all(off.sample(5) == 0)
    assert off.search_levels(2) == [0]


def test_sample_is_uniform_over_levels():
    t = BlurSchedule().sample(22000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t.long(), minlength=12)
    assert counts[0] == 0
    assert counts[1:].min() > 1800 and counts[1:].max() < 2200


def test_sigma_of_level_and_back():
    s = BlurSchedule()
    t = torch.tensor([0.0, 1.0, 5.0, 11.0])
    assert torch.allclose(s.sigma(t), torch.tensor([0.0, 0.1, 0.5, 1.1]))
    assert s.level_of(0.5) == pytest.approx(5.0)
    with pytest.raises(D2maeError, match="outside"):
        s.level_of(2.0)


@pytest.mark.parametrize("start,stop,step", [(0.0, 1.1, 0.1), (-1, 1, 0.1), (1.2, 1.1, 0.1), (0.1, 1.1, 0.0)])
def test_bad_schedules_are_refused(start, stop, step):
    with pytest.raises(D2maeError, match="sigma"):
        BlurSchedule(start, stop, step)


def test_blur_matches_scipy_with_mixed_sigmas():
    torch.manual_seed(0)
    x = torch.rand(6, 2, 40, 33)
    sigma = torch.tensor([0.0, 0.1, 0.5, 1.1, 1.6, 0.3])
    y = gaussian_blur(x, sigma)
    for i in range(6):
        for c in range(2):
            ref = gaussian_filter(x[i, c].double().numpy(), float(sigma[i]), mode="reflect", truncate=4.0)
            assert np.abs(y[i, c].numpy() - ref).max() < 1e-4  # everywhere, borders included


def test_each_sample_gets_its_own_sigma():
    x = torch.rand(1, 1, 24, 24).expand(3, -1, -1, -1)
    y = gaussian_blur(x, torch.tensor([0.2, 0.9, 0.2]))
    assert torch.allclose(y[0], y[2])
    assert not torch.allclose(y[0], y[1], atol=1e-3)
    assert torch.allclose(y[1], gaussian_blur(x[1:2], torch.tensor([0.9]))[0])


def test_blur_preserves_constants_and_sigma_zero_is_identity():
    x = torch.full((2, 1, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(x, torch.tensor([1.1, 1.6])), x, atol=1e-6)
    z = torch.rand(2, 3, 16, 20)
    assert torch.equal(gaussian_blur(z, torch.zeros(2)), z)


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(0.05, 3.0), n=st.integers(4, 48))
def test_blur_rows_sum_to_one(sigma, n):
    m = blur_matrix(sigma, n)
    assert torch.allclose(m.sum(1), torch.ones(n), atol=1e-5)
    assert (m >= 0).all()


def _ddpm_timestep_embedding(t: np.ndarray, dim: int) -> np.ndarray:
    """DDPM's get_timestep_embedding (Ho et al. 2020), transcribed in NumPy float64."""
    half = dim // 2
    freqs = np.exp(np.arange(half) * -(np.log(10000.0) / (half - 1)))
    args = t[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    return np.pad(emb, ((0, 0), (0, 1))) if dim % 2 else emb


@pytest.mark.parametrize("dim", [64, 65, 192, 768])
def test_sinusoidal_embedding_is_ddpms(dim):
    """BLU(t)'s fixed part is DDPM's timestep embedding: frequencies 10000^(−i/(h−1)), sines then cosines."""
    t = np.arange(12, dtype=np.float64)
    got = sinusoidal_embedding(torch.from_numpy(t).float(), dim).double().numpy()
    np.testing.assert_allclose(got, _ddpm_timestep_embedding(t, dim), atol=2e-6)
    # the first and last frequencies are exactly 1 and 1/10000
    e = sinusoidal_embedding(torch.tensor([1.0]), 4)[0]
    torch.testing.assert_close(e, torch.tensor([np.sin(1.0), np.sin(1e-4), np.cos(1.0), np.cos(1e-4)]).float())
    dist = torch.cdist(torch.from_numpy(got), torch.from_numpy(got))
    assert dist[~torch.eye(12, dtype=bool)].min() > 0.1  # distinct levels, distinct tokens


def test_blur_is_fp32_under_autocast():
    """The blur of a 0.1-pixel σ must not be rounded to bf16 by autocast: same result, fp32, with and without."""
    x = torch.rand(4, 1, 40, 40)
    sigma = torch.tensor([0.1, 0.4, 0.8, 1.1])
    plain = gaussian_blur(x, sigma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gaussian_blur(x, sigma)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain)


def test_resampling_and_the_models_blur_are_fp32_under_autocast(tiny_config):
    from d2mae.data.resample import crop_resize
    from d2mae.method.models import DeblurMAE

    enc = DeblurMAE(tiny_config).encoder
    x = torch.rand(2, 1, 32, 32)
    t = torch.tensor([5.0, 11.0])
    boxes = torch.tensor([[1.5, 2.5, 30.0, 31.0], [0.0, 0.0, 32.0, 32.0]], dtype=torch.float64)
    sizes = torch.tensor([[32, 32], [32, 32]])
    plain = enc.blur(x, t), crop_resize(x, sizes, boxes, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = enc.blur(x, t), crop_resize(x, sizes, boxes, 24)
    for a, b in zip(plain, mixed):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_level_one_is_the_identity_so_fixed_0_1_is_no_blur_with_the_token_of_t_1(tiny_config):
    """σ_1 = 0.1: its kernel's radius int(4σ + 0.5) is 0, so x_b^(1) = x. `--obs fixed:0.1` (t = 1) therefore shows
    the classifier the un-blurred pixels of `--obs none` (t = 0) with a token seen in pre-training."""
    from d2mae.method.models import DeblurMAE
    from d2mae.method.obs import ObsSpec

    enc = DeblurMAE(tiny_config).encoder
    x = torch.rand(3, 1, 32, 32)
    assert torch.equal(enc.blur(x, torch.ones(3)), enc.blur(x, torch.zeros(3)))
    assert enc.schedule.level_of(ObsSpec.parse("fixed:0.1").sigma) == 1.0
    assert not torch.equal(enc.blur_embedding(torch.ones(1)), enc.blur_embedding(torch.zeros(1)))
