"""Freed tensor memory kept inside the process, so that a CPU training step stops page-faulting its activations.

PyTorch's CPU tensors come from ``malloc``. With its defaults, glibc serves a large request (above the *mmap
threshold*: 128 KiB at first, raised as large blocks are freed) with a fresh ``mmap`` and returns freed memory at the
top of the heap to the kernel (above the *trim threshold*). Either way the next step's activations land on pages the
kernel must fault in and zero again: 8,000-15,000 minor page faults per step of ``configs/busbra-cpu.yaml``'s model
(ViT-Tiny, 96 px, batch 64), and an ``munmap`` can make the other cores flush their TLBs. Measured on a 2-core
AMD EPYC (``benchmarks/allocator_speed.py``, numbers in ``benchmarks/RESULTS.md``): with the memory kept, the step
page-faults almost never and runs faster, most at 2 threads.

:func:`keep_freed_memory` sets three ``mallopt`` parameters: the mmap threshold to glibc's maximum (32 MiB on 64-bit),
so blocks up to that size come from the heap and are reused; the trim threshold to 2 GiB, so freed heap is kept; and
a top pad of 64 MiB, so the heap grows in large steps. Only the process's peak, which a training step reaches every
step anyway, stays resident. It never changes a computed number. It does nothing where the C library is not glibc,
and nothing when the user chose for themselves: any ``MALLOC_*`` variable or a ``glibc.malloc`` tunable in
``GLIBC_TUNABLES`` (an allocator preloaded with ``LD_PRELOAD``, jemalloc or tcmalloc, keeps its own rules; these
calls do not reach it).

The command line applies it before a command runs (:mod:`d2mae.commands.main`); a Python user calls it once at the
start of a script.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Mapping

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

#: mallopt parameter → value: the largest mmap threshold glibc accepts on 64-bit (4 · 1 MiB · sizeof(long)), freed
#: heap kept up to 2 GiB, the heap grown 64 MiB at a time.
KEEP = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 64 * 2**20}


def user_chose(env: Mapping[str, str]) -> bool:
    """Whether the environment already sets glibc's allocator (``MALLOC_*`` variables, ``glibc.malloc`` tunables) or
    preloads another allocator."""
    if any(k.startswith("MALLOC_") for k in env):
        return True
    return "glibc.malloc" in env.get("GLIBC_TUNABLES", "") or "malloc" in env.get("LD_PRELOAD", "")


def keep_freed_memory(env: Mapping[str, str] | None = None) -> bool:
    """Keep freed memory in this process (module docstring). Returns whether the settings were applied: ``False``
    off glibc, when the user chose (:func:`user_chose`), or when glibc refused a value."""
    if user_chose(os.environ if env is None else env):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in KEEP.items())  # glibc returns 1 on success
