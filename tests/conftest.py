"""Shared fixtures: tiny model configs and the location of the BUS-BRA data beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from d2mae.method.model_config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("D2MAE_SHARED", REPO.parent / "shared"))  # benchmarks/mutations.py runs copies
BUSBRA = SHARED / "data" / "bus-bra"

TINY = dict(arch="vit_tiny_patch16", img_size=32, depth=2, embed_dim=64, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(**TINY)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# One intra-op thread: the test models are tiny, and on a loaded 2-core machine OpenMP threads spin-waiting on each
# other made their steps 10-100x slower. Subprocesses started by tests inherit the variable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one torch thread (as above), whatever an earlier test set; bit-equal comparisons
    with subprocesses (OMP_NUM_THREADS=1) need the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def busbra() -> Path:
    if not (BUSBRA / "images").is_dir():
        pytest.skip("BUS-BRA data not found beside the repository (../shared/data/bus-bra)")
    return BUSBRA
