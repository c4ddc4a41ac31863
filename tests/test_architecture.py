"""The layout tells the paper's story: each layer imports only the layers below it, the command line alone knows
flags, the method alone knows no files or figures, and each value has one home."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "d2mae"

# Each layer and the layers it may import (besides itself). The order is the story, from the bottom up.
LAYERS: dict[str, set[str]] = {
    "runtime": set(),
    "method": {"runtime"},
    "data": {"runtime"},
    "io": {"runtime", "method", "data"},
    "eval": {"runtime", "method", "data", "io"},
    "train": {"runtime", "method", "data", "io", "eval"},
    "experiment": {"runtime", "method", "data", "io", "eval", "train"},
    "commands": {"runtime", "method", "data", "io", "eval", "train", "experiment"},
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth of the file (function-level imports included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
            out.extend(f"{node.module}.{a.name}" for a in node.names)
    return out


def _layer(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else None


def test_every_module_belongs_to_a_layer() -> None:
    loose = [p.name for p in _modules() if _layer(p) is None and p.name not in ("__init__.py", "__main__.py")]
    assert loose == []
    assert {_layer(p) for p in _modules()} - {None} == set(LAYERS)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = []
    for path in _modules():
        if _layer(path) != layer:
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "d2mae" and len(parts) > 1 and parts[1] in LAYERS:
                if parts[1] != layer and parts[1] not in LAYERS[layer]:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert wrong == []


def test_only_the_command_layer_knows_about_flags() -> None:
    users = [str(p.relative_to(PACKAGE)) for p in _modules() if "argparse" in _imports(p) and _layer(p) != "commands"]
    assert users == []


def test_the_method_draws_no_figures_and_touches_no_files() -> None:
    banned = ("matplotlib", "PIL", "csv", "yaml", "json", "safetensors", "torch.utils.data")
    found = [f"{p.name}: {n}" for p in _modules() if _layer(p) == "method"
             for n in _imports(p) if n.split(".")[0] in banned or n.startswith("torch.utils.data")]
    assert found == []


def _literal_defaults(name: str) -> list[str]:
    """Places where a field or parameter called ``name`` gets a literal number as its default."""
    out = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                value = node.value
                if isinstance(value, ast.Call):  # field(default=...)
                    value = next((k.value for k in value.keywords if k.arg == "default"), None)
                if isinstance(value, ast.Constant) and isinstance(value.value, (int, float)):
                    out.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                for a, d in zip(args, defaults):
                    if a.arg == name and isinstance(d, ast.Constant) and isinstance(d.value, (int, float)):
                        out.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return out


def test_the_search_step_has_one_home() -> None:
    """s = 2 is ``d2mae.method.obs.DEFAULT_SEARCH_STEP``; every other default refers to it."""
    assert _literal_defaults("search_step") == []
    from d2mae.method.obs import DEFAULT_SEARCH_STEP

    assert DEFAULT_SEARCH_STEP == 2


@pytest.mark.parametrize("name", ["sigma_start", "sigma_stop", "sigma_step"])
def test_the_blur_schedule_defaults_have_one_home(name: str) -> None:
    """σ 0.1 → 1.1 step 0.1 are :class:`d2mae.method.blur.BlurSchedule`'s defaults; ModelConfig refers to them."""
    assert _literal_defaults(name) == []
    from d2mae.method.blur import BlurSchedule
    from d2mae.method.models import ModelConfig

    schedule = ModelConfig().schedule
    assert (schedule.start, schedule.stop, schedule.step) == (BlurSchedule.start, BlurSchedule.stop, BlurSchedule.step)


def test_no_import_time_side_effects_on_the_environment() -> None:
    """Importing d2mae's packages sets no environment variable (threads are a runtime setting of each command)."""
    import subprocess
    import sys

    code = ("import os, torch, torchvision, timm, timm.layers, timm.optim, timm.scheduler, sklearn.metrics, scipy.stats, "
            "matplotlib.figure; before = dict(os.environ); import d2mae.experiment, d2mae.train.pretrain, "
            "d2mae.train.finetune, d2mae.commands.main, d2mae.commands.experiment; "
            "assert dict(os.environ) == before, set(os.environ) ^ set(before)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_readme_python_api_imports_from_the_package() -> None:
    from d2mae import FinetuneConfig, evaluate_run, finetune, make_config, pretrain

    assert callable(pretrain) and callable(finetune) and callable(evaluate_run) and callable(make_config)
    assert FinetuneConfig(labels="x", out="y").spec.mode == "search"
