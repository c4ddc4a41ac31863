"""Freed memory kept in the process: a repeated step stops page-faulting, the user's own choice is left alone.

The fact checked is the kernel's: ``getrusage``'s minor page-fault count over repeated "steps" that ask ``malloc``
for activation-sized blocks (as PyTorch's CPU allocator does), write them and free them, in a fresh process each (the
allocator's state is per process). Raw ``malloc`` keeps the pattern exact: tensors would interleave the small blocks
of their own bookkeeping, which decide by chance whether glibc's defaults can trim."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from d2mae.runtime import memory
from tests.conftest import REPO

STEPS = """
import ctypes, resource, sys
from d2mae.runtime.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def step():  # a step's activations, as PyTorch's CPU allocator asks malloc for them: 24 blocks of 0.5-6 MiB alive
    blocks = [libc.malloc(2**19 * (1 + i % 12)) for i in range(24)]  # together, written, then all freed
    for i, b in enumerate(blocks):
        ctypes.memset(b, 1, 2**19 * (1 + i % 12))
    for b in blocks:
        libc.free(b)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_step(mode: str) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if not memory.user_chose({k: v})}
    out = subprocess.run([sys.executable, "-c", STEPS, mode], check=True, capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(REPO / "src")}).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_kept_memory_stops_the_page_faults_of_a_repeated_step():
    applied, kept = faults_per_step("keep")
    if not applied:
        pytest.skip("the C library is not glibc")
    _, default = faults_per_step("default")
    # 24 blocks of 0.5-6 MiB are ~19,000 pages a step: glibc's defaults give them back and fault them in again
    assert default > 2000, default
    assert kept < 0.05 * default, (kept, default)


def test_the_users_own_allocator_choice_is_left_alone():
    assert memory.user_chose({"MALLOC_ARENA_MAX": "2"})
    assert memory.user_chose({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert memory.user_chose({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert memory.user_chose({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    assert not memory.user_chose({"PATH": "/usr/bin", "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1"})
    assert memory.keep_freed_memory({"MALLOC_TOP_PAD_": "0"}) is False


def test_the_command_line_keeps_freed_memory_before_a_command_runs(monkeypatch):
    from d2mae.commands import main as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        cli.main(["phantoms", "--help"])  # help computes nothing: nothing set
    assert calls == []
    with pytest.raises(SystemExit):
        cli.main(["phantoms", "--no-such-flag"])  # a computing command sets it before its flags are read
    assert calls == [1]
