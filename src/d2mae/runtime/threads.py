"""CPU threads: one policy for every command, so that a busy machine still gives a run its fair share.

Two settings decide how PyTorch's CPU kernels use the cores:

* **How many intra-op threads** (``--threads N``, ``threads:`` in a config): default ``OMP_NUM_THREADS`` when set,
  else one per core this process may use (``os.sched_getaffinity``), divided among the processes torchrun starts on
  the node (``LOCAL_WORLD_SIZE``).
* **How an idle OpenMP thread waits** for the next parallel region. libgomp's default spins for a long time before
  it sleeps. On an idle machine that is the fastest; when another program holds a core, a spinning thread keeps
  waiting on a sibling the kernel has descheduled, and a 2-core run falls to about 30% of its idle speed where the
  fair share is 50% (benchmarks/contention.py). Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) holds the fair share
  under contention; idle, it costs nothing at busbra-cpu.yaml's step but half the speed of a small one (ViT-Tiny at
  64 px, batch 32: benchmarks/wait_policy_idle.py), where each short parallel region wakes the threads. So the
  command line looks before it starts: when other tasks are runnable at that moment (the run queue of
  ``/proc/loadavg``, sampled a few times), it chooses ``PASSIVE``; on an idle machine it keeps libgomp's default.
  Variables the user set (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``KMP_BLOCKTIME``) are never changed. The choice
  cannot follow load that starts later (OpenMP reads it once); set ``OMP_WAIT_POLICY=PASSIVE`` yourself on a
  machine that will be shared.
  The wait policy never changes the numbers a run computes; the thread count can (reductions are split by it), so
  it is recorded and the same ``--threads`` reproduces a run bit for bit.

The wait policy is read once, when PyTorch loads its OpenMP runtime: :func:`wait_policy_environment` is applied by
the command line before anything imports torch (``d2mae.commands.main``), never at import time of a d2mae module.
A Python user who wants it sets the variables before ``import torch`` (docs/threads.md).
"""

from __future__ import annotations

import os
from typing import MutableMapping

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def runnable_others(samples: int = 5, interval: float = 0.02) -> float:
    """Other tasks runnable right now (the median over ``samples`` readings of ``/proc/loadavg``'s run queue, this
    process not counted); 0 where the kernel does not say."""
    import time

    counts = []
    for i in range(samples):
        try:
            running = open("/proc/loadavg", encoding="ascii").read().split()[3].split("/")[0]
        except (OSError, IndexError):
            return 0.0
        counts.append(int(running) - 1)
        if i < samples - 1:
            time.sleep(interval)
    return float(sorted(counts)[len(counts) // 2])


def wait_policy_environment(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Choose the OpenMP wait policy in ``env`` (default ``os.environ``) as the module docstring says, unless the
    user set one; returns what was set (empty: libgomp's default, or the user's choice)."""
    env = os.environ if env is None else env
    if any(v in env for v in WAIT_VARIABLES):
        return {}
    if runnable_others() >= 1:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {}


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else one intra-op thread per available core, shared among the node's torchrun
    processes."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, available_cores() // max(1, local))


def configure_threads(threads: int | None) -> int:
    """Set PyTorch's intra-op threads (``None``: :func:`default_threads`); returns the number in use."""
    import torch

    n = default_threads() if threads is None else int(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def thread_report() -> dict[str, object]:
    """What a run records about its threads (beside its outputs)."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "cores": available_cores(),
            **{v: os.environ[v] for v in WAIT_VARIABLES if v in os.environ}}
