"""``d2mae demo``: the paper's whole pipeline on synthetic ultrasound phantoms, end to end, in minutes on a CPU.

It runs the experiment config shipped inside the package (``d2mae/configs/demo.yaml``, the same file as the
repository's ``configs/demo.yaml``): phantoms from four simulated scanners are generated, MAE, DeblurrMAE and D²MAE
are pre-trained with the same budget, every Table-2 method (and a ViT trained from scratch) is fine-tuned on the
same folds, and a report with the paper's tables and figures is written. The last line printed is the report's
path::

    d2mae demo                      # into ./d2mae-demo (3.5 minutes on an idle 2-core CPU)
    d2mae demo --out /tmp/demo      # elsewhere
    d2mae demo --quick              # a smaller, faster version: a smoke test of the install

Running it again into the same folder reuses every finished stage (the report is rewritten); delete the folder to
start over. Python: ``run_demo("d2mae-demo")`` returns the path of ``report.md``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from d2mae.experiment import load_experiment, run_experiment
from d2mae.runtime.errors import D2maeError

DEFAULT_OUT = "d2mae-demo"

#: ``--quick``: fewer phantoms and epochs (the same four methods, protocol and figures).
QUICK_OVERRIDES: tuple[str, ...] = (
    "name=demo-quick",
    "description=Quick synthetic phantom demo (a smoke test: tiny budget, numbers are not meaningful).",
    "budget.pretrain_epochs=5",
    "budget.finetune_epochs=5",
    "datasets.phantoms.phantoms.n=150",
    "datasets.phantoms.pretrain_phantoms.n=160",
    "pretrain.warmup_epochs=1",
    "finetune.warmup_epochs=1",
    "report.n_bootstrap=200",
)


def demo_config() -> Path:
    """The demo config shipped inside the package (``d2mae/configs/demo.yaml``)."""
    path = Path(str(resources.files("d2mae") / "configs" / "demo.yaml"))
    if not path.is_file():  # pragma: no cover - a broken installation

        raise D2maeError(f"the packaged demo config {path} is missing; reinstall d2mae")
    return path


def run_demo(out: str | Path = DEFAULT_OUT, quick: bool = False, estimate: bool = True) -> Path:
    """Run the demo experiment into ``out`` (finished stages there are reused); returns the report.md path."""
    cfg = load_experiment(demo_config(), QUICK_OVERRIDES if quick else ())
    return run_experiment(cfg, out, resume=True, estimate=estimate)


