"""Resumable runs: derived seeds, RNG snapshots, atomic checkpoints loadable with weights_only, the lr schedule."""

from __future__ import annotations

import os
import random
import stat

import numpy as np
import pytest
import torch

from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_text, load_checkpoint, save_checkpoint
from d2mae.runtime.seeds import capture_rng_state, derive_seed, restore_rng_state
from d2mae.train.optim import warmup_cosine_scheduler


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    seeds = {derive_seed(0, e, s) for e in range(20) for s in range(20)}
    assert len(seeds) == 400
    assert all(0 <= v < 2**63 for v in seeds)
    with pytest.raises(ValueError):
        derive_seed(-1)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in NumPy's state
    state = capture_rng_state()
    path = tmp_path / "state.pt"
    save_checkpoint({"rng": state}, path)
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(torch.load(path, weights_only=True)["rng"])
    again = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert expected[:3] == again[:3]
    assert torch.equal(expected[3], again[3])


def test_checkpoints_refuse_unloadable_values_and_are_atomic(tmp_path):
    path = tmp_path / "resume.pt"
    save_checkpoint({"a": torch.ones(2), "b": [1, 2.0, "x", None], "c": {"d": (1, 2)}}, path)
    assert torch.load(path, weights_only=True)["c"]["d"] == (1, 2)
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint({"bad": np.zeros(2)}, path)
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint({"bad": np.float32(1.0)}, path)
    # the failed saves left the good file and no temporary files behind
    assert torch.load(path, weights_only=True)["b"] == [1, 2.0, "x", None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.pt"]


def test_written_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_checkpoint({"x": 1}, tmp_path / "b.pt")
    finally:
        os.umask(umask)
    for name in ("a.txt", "b.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(D2maeError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(D2maeError, match="cannot be read"):
        load_checkpoint(bad)


def test_warmup_then_cosine_per_step(tmp_path):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = warmup_cosine_scheduler(opt, total_steps=10, warmup_steps=4, min_lr=0.1)
    lrs = []
    for step in range(10):
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # linear warm-up to the peak
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # then strictly decreasing
    assert lrs[-1] > 0.1 and lrs[-1] < 0.2  # half-cosine towards min_lr
    # the schedule's state is plain: it resumes from a weights_only checkpoint
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = warmup_cosine_scheduler(opt2, total_steps=10, warmup_steps=4, min_lr=0.1)
    save_checkpoint({"s": sched.state_dict()}, tmp_path / "s.pt")
    sched2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["s"])
    sched2.step_update(num_updates=7)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[7])


def test_warmup_longer_than_the_run_is_clamped():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_scheduler(opt, total_steps=3, warmup_steps=100, min_lr=0.0)
    sched.step_update(num_updates=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(2 / 3)
