"""Artefacts that cannot run code, configs that cannot break the parser, and bf16 against fp32 (issue: trust)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurMAE
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import load_checkpoint
from d2mae.runtime.options import build_config
from d2mae.train.pretrain_config import PretrainConfig
from tests.conftest import TINY


class _RunsCode:
    """Unpickling this object would create a marker file (a stand-in for arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_resume_state_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "resume.pt"
    torch.save({"model": {}, "payload": _RunsCode(str(marker))}, bad, pickle_protocol=2)
    with pytest.raises(D2maeError, match="cannot be read"):
        load_checkpoint(bad)
    assert not marker.exists()
    with open(bad, "rb") as fh:  # the payload is real: a plain unpickler would have run it
        assert b"pwned" in fh.read()


def test_pretrain_resume_from_a_malicious_state_is_a_clear_error(tmp_path):
    from d2mae.commands.main import main

    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"payload": _RunsCode(str(marker))}, out / "resume.pt")
    img = tmp_path / "img"
    img.mkdir()
    from PIL import Image
    for i in range(4):
        Image.new("L", (32, 32), color=40 * i).save(img / f"{i}.png")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    code = main(["pretrain", "--data", str(img), "--out", str(out), "--resume", "--epochs", "1",
                 "--batch-size", "2", "--device", "cpu", *flags])
    assert code == 2
    assert not marker.exists()


fold_metric_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4),
                                                                                                st.integers(), max_size=2))
_keys = st.sampled_from(["epochs", "batch_size", "img_size", "sigma_start", "sigma_stop", "blur_embed", "mean",
                         "model", "mask_ratio", "data", "seed", "blur", "lr", "not_an_option", "decoder-depth"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, fold_metric_values, max_size=4))
def test_config_parser_gives_a_config_or_a_clear_error(mapping):
    """Whatever a YAML file holds, the parser returns a config or raises D2maeError — nothing else."""
    try:
        cfg = build_config(PretrainConfig, ({"data": ["x"], "out": "o"}, "defaults"), (mapping, "fuzz.yaml"))
    except D2maeError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(cfg, PretrainConfig)


def test_bf16_and_fp32_losses_agree_within_tolerance():
    """The same seed in bf16 autocast and in fp32 gives losses within 2% (bf16 keeps 8 bits of mantissa)."""
    torch.manual_seed(0)
    model = DeblurMAE(ModelConfig(**TINY)).eval()
    x = torch.rand(8, 1, 32, 32)
    t = torch.full((8,), 5.0)
    noise = torch.rand(8, 4)
    with torch.no_grad():
        fp32, _, _ = model(x, t, noise=noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, _, _ = model(x, t, noise=noise)
    assert torch.isfinite(bf16)
    assert abs(bf16.item() - fp32.item()) <= 0.02 * fp32.item()
