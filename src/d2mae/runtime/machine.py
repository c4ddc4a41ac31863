"""The machine a run ran on (CPU model, cores, memory, accelerator, library versions), recorded beside every
experiment's results."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy
import sklearn
import timm
import torch


def machine_info() -> dict[str, Any]:
    """Platform, CPU, cores, memory, GPU and the versions of the software that matter."""

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 1
    memory = None
    try:
        memory = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(f"{props.name} ({props.total_memory / 2**30:.0f} GiB)")

    return {"platform": platform.platform(), "cpu": cpu, "cores": affinity, "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "memory_gib": memory, "gpus": gpus or ["none"],
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "d2mae": _version()}


def _version() -> str:
    """d2mae's installed version (read from the package's metadata: importing ``d2mae`` from here would be a
    circle of imports, since ``d2mae`` reaches every module)."""
    try:
        return metadata.version("d2mae")
    except metadata.PackageNotFoundError:
        return "unknown"
