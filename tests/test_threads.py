"""Threads as a runtime setting: one policy, no import-time side effects, ``--threads`` on every command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from d2mae.runtime import threads
from tests.conftest import REPO


def test_importing_d2mae_changes_no_environment_variable():
    code = ("import os, sklearn, timm, torch; before = dict(os.environ)  # the libraries' own variables are theirs\n"
            "import d2mae, d2mae.commands.main, d2mae.experiment, d2mae.train.pretrain, d2mae.train.tasks\n"
            "import d2mae.eval.obs, d2mae.eval.predict\n"
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n")
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_VARIABLES}
    subprocess.run([sys.executable, "-c", code], check=True, env={**env, "PYTHONPATH": str(REPO / "src")})


def test_the_wait_policy_sleeps_only_when_the_cpu_is_busy_and_never_overrides_the_user(monkeypatch):
    monkeypatch.setattr(threads, "runnable_others", lambda: 1.0)
    env: dict[str, str] = {}
    assert threads.wait_policy_environment(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setattr(threads, "runnable_others", lambda: 0.0)
    env = {}
    assert threads.wait_policy_environment(env) == {} and env == {}  # idle: libgomp's default
    monkeypatch.setattr(threads, "runnable_others", lambda: 3.0)
    env = {"GOMP_SPINCOUNT": "5"}
    assert threads.wait_policy_environment(env) == {} and env == {"GOMP_SPINCOUNT": "5"}


def test_default_threads_follow_omp_num_threads_then_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.default_threads() == max(1, threads.available_cores() // 2)


@pytest.mark.parametrize("command", ["pretrain", "obs", "finetune", "predict", "experiment"])
def test_every_heavy_command_takes_threads(command):
    from d2mae.commands import main as cli

    help_text = cli.build_parser(command).format_help()
    assert "--threads" in help_text


def test_threads_option_sets_torch_threads(tmp_path):
    from d2mae.data.phantom import generate_phantoms
    from d2mae.train.pretrain import pretrain
    from d2mae.train.pretrain_config import make_config
    from tests.conftest import TINY

    generate_phantoms(tmp_path / "ph", n=8, size=32)
    before = torch.get_num_threads()
    try:
        pretrain(make_config(data=[str(tmp_path / "ph" / "images")], out=str(tmp_path / "o"), epochs=1, batch_size=4,
                             threads=2, tensorboard="off", num_workers=0, **TINY))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
