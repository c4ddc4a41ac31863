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
    "segment": {"runtime", "method", "data", "io", "eval"},
    "view": {"runtime", "method", "data", "io", "eval", "segment"},
    "train": {"runtime", "method", "data", "io", "eval", "segment"},
    "experiment": {"runtime", "method", "data", "io", "eval", "segment", "view", "train"},
    "commands": {"runtime", "method", "data", "io", "eval", "segment", "view", "train", "experiment"},
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


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module → the package's modules it imports, at any depth of the file (imports inside functions count: they
    only hide a circle until the function runs)."""
    paths = {_module_name_in(package, p): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in paths:  # ``from pkg import module`` or ``from module import name``
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):  # a package's own __init__
                targets.add(imported)
        graph[name] = targets
    return graph


def _module_name_in(package: Path, path: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_circle_of_imports_anywhere_in_the_package() -> None:
    """No module reaches itself through imports, inside a package or across packages, counting imports inside
    functions (a package ``__init__`` importing its own modules is not a circle)."""
    assert import_circles(import_graph(PACKAGE)) == []


def test_the_circle_check_finds_a_planted_circle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "data").mkdir(parents=True)
    for name in ("__init__.py", "data/__init__.py", "data/c.py"):
        (pkg / name).write_text("")
    (pkg / "data" / "a.py").write_text("from pkg.data.b import f\n")
    (pkg / "data" / "b.py").write_text("def f():\n    from pkg.data import a\n    return a\n")  # hidden in a function
    assert import_circles(import_graph(pkg)) == [["pkg.data.a", "pkg.data.b"]]


# Imports inside functions are kept only where they must be: the command entry point and the thread policy load
# torch (and so OpenMP) only after the wait policy is chosen (docs/threads.md); optional extras load when used, and
# so do segmentation's libraries (about 2 s of imports that classification commands never need).
LAZY_IMPORT_FILES = {"commands/main.py", "runtime/threads.py", "__init__.py"}
OPTIONAL_EXTRAS = ("pydicom", "transformers", "tensorboard", "torch.utils.tensorboard", "monai",
                   "segmentation_models_pytorch")


def test_imports_sit_at_the_top_of_each_file() -> None:
    found = []
    for path in _modules():
        rel = str(path.relative_to(PACKAGE))
        if rel in LAZY_IMPORT_FILES:
            continue
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                        if not (mod or "").startswith(OPTIONAL_EXTRAS):
                            found.append(f"{rel}:{node.lineno} {fn.name} imports {mod}")
    assert found == []


def test_no_file_over_900_lines_and_no_function_over_120() -> None:
    """A generous alarm, not a target: files split where a concept splits, never to meet a count; a file or a
    function past these sizes is worth a look."""
    long_files = [f"{p.relative_to(PACKAGE)} ({n})" for p in _modules()
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > 900]
    long_functions = [f"{p.relative_to(PACKAGE)}:{fn.name} ({fn.end_lineno - fn.lineno + 1})" for p in _modules()
                      for fn in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.end_lineno - fn.lineno >= 120]
    assert long_files == [] and long_functions == []


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
    from d2mae.method.model_config import ModelConfig

    schedule = ModelConfig().schedule
    assert (schedule.start, schedule.stop, schedule.step) == (BlurSchedule.start, BlurSchedule.stop, BlurSchedule.step)


def test_no_import_time_side_effects_on_the_environment() -> None:
    """Importing d2mae's packages sets no environment variable (threads are a runtime setting of each command).
    MONAI's own import sets CUBLAS_WORKSPACE_CONFIG (deterministic cuBLAS); it is a third party, imported first."""
    import subprocess
    import sys

    code = ("import os, torch, torchvision, timm, timm.layers, timm.optim, timm.scheduler, sklearn.metrics, scipy.stats, "
            "matplotlib.figure, monai; before = dict(os.environ); import d2mae.experiment, d2mae.train.pretrain, "
            "d2mae.train.tasks, d2mae.commands.main, d2mae.commands.experiment; "
            "assert dict(os.environ) == before, set(os.environ) ^ set(before)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_readme_python_api_imports_from_the_package() -> None:
    from d2mae import FinetuneConfig, evaluate_run, finetune, make_config, pretrain

    assert callable(pretrain) and callable(finetune) and callable(evaluate_run) and callable(make_config)
    assert FinetuneConfig(labels="x", out="y").spec.mode == "search"
