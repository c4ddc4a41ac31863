"""`d2mae experiment` reads like the issue: a checked config, a plan that lists every run, the equal-budget rule,
resume of an interrupted experiment, Table 2/3-style tables on known numbers, and a real micro experiment end to end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from d2mae import experiment as ex
from d2mae.commands import main as cli
from d2mae.experiment import runner
from d2mae.runtime.errors import D2maeError
from tests.conftest import BUSBRA, REPO, TINY

MICRO = {
    "name": "micro",
    "seeds": [0],
    "methods": ["supervised", "d2mae"],
    "model": dict(TINY),
    "budget": {"pretrain_epochs": 1, "pretrain_batch_size": 8, "finetune_epochs": 1, "finetune_batch_size": 8},
    "pretrain": {"warmup_epochs": 0, "log_every_steps": 1, "lr": 1e-3},
    "finetune": {"workers": 0, "warmup_epochs": 0, "progress": False, "blr": 5e-3},
    "datasets": {"ph": {"phantoms": {"n": 30, "size": 32, "seed": 0}, "protocol": "kfold:2"}},
    "report": {"sample_images": 2, "obs_images": 1, "n_bootstrap": 50},
}


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def with_changes(**changes) -> dict:
    data = json.loads(json.dumps(MICRO))
    for dotted, value in changes.items():
        node = data
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


# ----------------------------------------------------------------------------------------------------- config schema


@pytest.mark.parametrize("changes, words", [
    ({"colour": "red"}, ["'colour'", "known top-level options"]),
    ({"budget__pretrain_epoch": 3}, ["budget.pretrain_epoch", "did you mean pretrain_epochs"]),
    ({"budget__pretrain_epochs": "many"}, ["budget.pretrain_epochs", "must be an integer"]),
    ({"seeds": ["a"]}, ["'seeds'", "must be an integer"]),
    ({"model__img_size": "big"}, ["model.img_size", "must be an integer"]),
    ({"model__sigma_stop": 1.6}, ["model.sigma_stop", "preset"]),
    ({"pretrain__epochs": 5}, ["pretrain.epochs", "budget"]),
    ({"pretrain__blr": "fast"}, ["pretrain.blr", "must be a number"]),
    ({"pretrain__depth": 4}, ["pretrain.depth", "model:"]),
    ({"finetune__batch_size": 4}, ["finetune.batch_size", "budget.finetune_batch_size"]),
    ({"finetune__obs": "none"}, ["finetune.obs", "methods"]),
    ({"finetune__layer_decay": [1, 2]}, ["finetune.layer_decay", "must be a number"]),
    ({"finetune__label_smooth": 0.1}, ["finetune.label_smooth"]),
    ({"methods": ["d2mae", "simclr"]}, ["unknown method 'simclr'"]),
    ({"ablations": ["dropout"]}, ["unknown group 'dropout'"]),
    ({"datasets__ph__protocol": "kfold:two"}, ["datasets.ph.protocol", "kfold:K"]),
    ({"datasets__ph__labels": "x.csv"}, ["datasets.ph", "exactly one of labels"]),
    ({"datasets__ph__phantoms": {"n": 30, "sise": 32}}, ["datasets.ph.phantoms.sise"]),
    ({"datasets__ph__pretrain_phantoms": {"n": 30, "out": "x"}}, ["datasets.ph.pretrain_phantoms.out"]),
    ({"datasets__ph__scanner": "Device"}, ["datasets.ph.scanner", "scanner_column"]),
    ({"budget__pretrain_images": 100}, ["pretrain_epochs or pretrain_images"]),
    ({"report__confidence": 2}, ["report.confidence"]),
])
def test_schema_errors_name_the_key_and_the_file(tmp_path, changes, words):
    path = write_config(tmp_path / "bad.yaml", with_changes(**changes))
    with pytest.raises(D2maeError) as err:
        ex.load_experiment(path)
    message = str(err.value)
    assert str(path) in message, message
    for w in words:
        assert w in message, (w, message)
    assert "\n" not in message


def test_schema_errors_exit_2_on_the_command_line(tmp_path, capsys):
    path = write_config(tmp_path / "bad.yaml", with_changes(budget__finetune_epochs="ten"))
    assert cli.main(["experiment", str(path), "--plan", "--no-estimate"]) == 2
    err = capsys.readouterr().err
    assert "budget.finetune_epochs" in err and str(path) in err and "Traceback" not in err


def test_overrides_and_environment_variables(tmp_path, monkeypatch):
    data = with_changes(datasets__real={"labels": "${D2MAE_TEST_ROOT:-/nowhere}/labels.csv", "protocol": "kfold:3"})
    path = write_config(tmp_path / "c.yaml", data)
    cfg = ex.load_experiment(path, ["budget.pretrain_epochs=7", "seeds=[1, 2]"])
    assert cfg.budget.pretrain_epochs == 7 and cfg.seeds == [1, 2]
    assert cfg.datasets["real"].labels == "/nowhere/labels.csv"
    monkeypatch.setenv("D2MAE_TEST_ROOT", str(tmp_path))
    assert ex.load_experiment(path).datasets["real"].labels == str(tmp_path / "labels.csv")
    with pytest.raises(D2maeError, match="--set KEY=VALUE"):
        ex.load_experiment(path, ["budget.pretrain_epochs"])
    with pytest.raises(D2maeError, match="D2MAE_UNSET_VAR"):
        ex.load_experiment(write_config(tmp_path / "d.yaml", with_changes(name="${D2MAE_UNSET_VAR}")))


def test_missing_dataset_path_is_a_clear_error_at_plan_time(tmp_path):
    data = with_changes()
    data["datasets"] = {"thyroid": {"root": "/path/to/GE4K", "labels": "labels.csv", "protocol": "split:3:1:1"}}
    cfg = ex.parse_experiment(data, "paper.yaml")
    with pytest.raises(D2maeError) as err:
        ex.make_plan(cfg, tmp_path / "out")
    msg = str(err.value)
    assert "datasets.thyroid.root" in msg and "/path/to/GE4K" in msg and "paper.yaml" in msg
    assert "--set datasets.thyroid.root=PATH" in msg


@pytest.mark.parametrize("name", ["paper-thyroid-ge4k.yaml", "paper-pancreas-lepset.yaml", "paper-ovary-mmotu.yaml"])
def test_paper_configs_parse_and_plan_names_the_placeholder_path(tmp_path, capsys, name):
    path = REPO / "configs" / name
    cfg = ex.load_experiment(path)
    assert cfg.model["arch"] == "vit_base_patch16" and cfg.model["img_size"] == 224
    effective = cfg.budget.pretrain_batch_size * cfg.pretrain.get("accum_iter", 1)
    assert effective == 1024 and cfg.budget.finetune_batch_size == 32
    assert cfg.methods == list(ex.TABLE2_METHODS)
    assert cli.main(["experiment", str(path), "--plan", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "datasets." in err and "--set" in err


def test_paper_configs_hold_the_paper_settings():
    want = {"paper-thyroid-ge4k.yaml": (8000, "split:3:1:1"), "paper-pancreas-lepset.yaml": (6000, "kfold:5"),
            "paper-ovary-mmotu.yaml": (16000, "csv")}
    for name, (epochs, protocol) in want.items():
        cfg = ex.load_experiment(REPO / "configs" / name)
        assert cfg.budget.pretrain_epochs == epochs
        (ds,) = cfg.datasets.values()
        assert ds.protocol == protocol


# ------------------------------------------------------------------------------------------------------------- plan


def full_config(tmp_path: Path) -> ex.ExperimentConfig:
    data = with_changes(seeds=[0, 1], methods=list(ex.TABLE2_METHODS),
                        ablations=["blur_range", "embedding", "obs_setting", "search_step"])
    return ex.load_experiment(write_config(tmp_path / "full.yaml", data))


def test_plan_lists_every_run_and_shares_pretrainings(tmp_path):
    cfg = full_config(tmp_path)
    plan = ex.make_plan(cfg, tmp_path / "out")
    runs = cfg.runs()
    assert [m.name for m in runs][:4] == list(ex.TABLE2_METHODS)
    table2_rows = {"mae-imagenet", "moco-v3-imagenet", "usfm", "moco-v3", "diffmae"}  # tests/test_table2.py
    segmentation_only = {"unet"}  # tests/test_segment.py
    assert {m.name for m in runs} == set(ex.METHODS) - table2_rows - segmentation_only  # every variant
    fine = plan.of("finetune")
    assert {(s.method, s.seed) for s in fine} == {(m.name, seed) for m in runs for seed in (0, 1)}
    presets = {"mae", "deblurrmae", "d2mae", "range-0.6", "range-1.6", "embed-none", "embed-add"}
    pre = plan.of("pretrain")
    assert len(pre) == len(presets) * 2 and {(s.preset, s.seed) for s in pre} == {(p, s) for p in presets
                                                                                    for s in (0, 1)}
    assert len(plan.of("arch")) == 1 and len(plan.of("data")) == 1
    # the OBS-setting and search-step variants reuse the d2mae pre-training of their seed
    d2 = {s.seed: s for s in pre if s.preset == "d2mae"}
    for name in ("d2mae", "d2mae-obs-none", "d2mae-obs-fixed-0.5", "d2mae-s1", "d2mae-s3"):
        for seed in (0, 1):
            st = plan.run_stage("ph", name, seed)
            assert st.payload.pretrained == str(d2[seed].folder)
    assert plan.run_stage("ph", "deblurrmae", 0).payload.obs == "fixed:1.1"
    assert plan.run_stage("ph", "mae", 0).payload.obs == "none"
    assert plan.run_stage("ph", "supervised", 0).payload.mode == "scratch"
    assert plan.run_stage("ph", "d2mae-s3", 1).payload.search_step == 3
    # every stage has its own folder; runs before their pre-training never happen
    assert len({s.folder for s in plan.stages}) == len(plan.stages)
    order = {s.id: i for i, s in enumerate(plan.stages)}
    assert all(order[n] < order[s.id] for s in fine for n in s.needs)
    text = ex.format_plan(plan)
    for s in plan.stages:
        assert s.label in text
    assert "the same for every method" in text


def test_plan_estimate_times_real_steps(tmp_path, capsys):
    path = write_config(tmp_path / "m.yaml", MICRO)
    assert cli.main(["experiment", str(path), "--plan", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "pre-train d2mae on ph (seed 0)" in out and "fine-tune supervised" in out
    assert not (tmp_path / "o").exists()  # --plan runs nothing and writes nothing


def test_cache_keys_follow_the_budget(tmp_path):
    cfg = ex.load_experiment(write_config(tmp_path / "a.yaml", MICRO))
    a = ex.make_plan(cfg, tmp_path / "out")
    b = ex.make_plan(ex.load_experiment(write_config(tmp_path / "b.yaml", with_changes(
        methods=["d2mae"], budget__finetune_epochs=3))), tmp_path / "out")
    c = ex.make_plan(ex.load_experiment(write_config(tmp_path / "c.yaml", with_changes(
        budget__pretrain_epochs=2))), tmp_path / "out")
    pre = lambda p: [s for s in p.of("pretrain") if s.preset == "d2mae"][0]  # noqa: E731
    assert pre(a).folder == pre(b).folder  # fine-tuning changes do not touch the cached pre-training
    assert pre(a).folder != pre(c).folder  # another budget is another model
    assert "d2mae-seed0-" in pre(a).folder.name and pre(a).folder.parent == tmp_path / "out" / "pretrained" / "ph"


# ---------------------------------------------------------------------------------------------- equal-budget rule


def test_equal_budget_every_method_gets_the_same(tmp_path):
    plan = ex.make_plan(full_config(tmp_path), tmp_path / "out")
    pre = plan.of("pretrain")
    assert {(p.payload.epochs, p.payload.batch_size, p.payload.max_steps, tuple(p.payload.data), p.payload.lr,
             p.payload.depth, p.payload.img_size) for p in pre} == {(1, 8, None, tuple(pre[0].payload.data), 1e-3, 2,
                                                                     32)}
    fine = plan.of("finetune")
    same = {(f.payload.epochs, f.payload.batch_size, f.payload.labels, f.payload.protocol, f.payload.folds,
             f.payload.blr, f.payload.patience) for f in fine}
    assert len(same) == 1
    for seed in (0, 1):  # one fold seed per seed: every method of a seed sees the same folds
        assert {f.payload.seed for f in fine if f.seed == seed} == {seed}


@pytest.mark.parametrize("kind, field, value", [
    ("pretrain", "epochs", 5), ("pretrain", "batch_size", 4), ("pretrain", "blr", 1.0), ("pretrain", "data", ["x"]),
    ("pretrain", "depth", 3), ("finetune", "epochs", 9), ("finetune", "protocol", "kfold:3"),
    ("finetune", "layer_decay", 0.5), ("finetune", "labels", "other.csv")])
def test_equal_budget_rule_refuses_a_method_with_more(tmp_path, kind, field, value):
    import dataclasses

    plan = ex.make_plan(full_config(tmp_path), tmp_path / "out")
    stage = plan.of(kind)[-1]
    stage.payload = dataclasses.replace(stage.payload, **{field: value})
    with pytest.raises(D2maeError, match=f"equal-budget rule broken on dataset 'ph'.*in {field}"):
        ex.check_equal_budget(plan)


def test_images_seen_budget_is_the_same_for_every_preset(tmp_path):
    data = with_changes(methods=list(ex.TABLE2_METHODS))
    data["budget"] = {"pretrain_images": 100, "pretrain_batch_size": 8, "finetune_epochs": 1,
                      "finetune_batch_size": 8}
    plan = ex.make_plan(ex.load_experiment(write_config(tmp_path / "i.yaml", data)), tmp_path / "out")
    pre = plan.of("pretrain")
    # ⌈100 / 8⌉ = 13 steps; 30 images make 3 steps per epoch, so 5 epochs (cut at step 13)
    assert {(p.payload.max_steps, p.payload.epochs) for p in pre} == {(13, 5)}
    assert "13 steps × batch 8 = 104 images seen" in ex.format_plan(plan)


# ----------------------------------------------------------------------------------------------------------- resume


def _fake_runners(monkeypatch, calls: list[str], crash_on: str | None):
    """Stages that write a marker file (and count their calls); the first ``crash_on`` fine-tuning crashes."""
    state = {"crashed": False}

    def fake(stage, plan):
        calls.append(stage.id)
        if stage.kind == "finetune" and stage.method == crash_on and not state["crashed"]:
            state["crashed"] = True
            stage.folder.mkdir(parents=True, exist_ok=True)
            (stage.folder / "partial").write_text("half-way")
            raise KeyboardInterrupt
        stage.folder.mkdir(parents=True, exist_ok=True)
        (stage.folder / "output.txt").write_text(stage.key)

    for kind in runner._RUNNERS:
        monkeypatch.setitem(runner._RUNNERS, kind, fake)
    # patched where run_experiment looks it up
    monkeypatch.setattr(runner, "write_report", lambda plan, wall_seconds=None, views=None: plan.out / "report.md")


def test_interrupted_experiment_resumes_where_it_stopped(tmp_path, monkeypatch):
    cfg = ex.load_experiment(write_config(tmp_path / "r.yaml", with_changes(methods=list(ex.TABLE2_METHODS))))
    out = tmp_path / "out"
    calls: list[str] = []
    _fake_runners(monkeypatch, calls, crash_on="deblurrmae")
    with pytest.raises(KeyboardInterrupt):
        ex.run_experiment(cfg, out, estimate=False)
    plan = ex.make_plan(cfg, out)
    first = list(calls)
    crashed = plan.run_stage("ph", "deblurrmae", 0)
    assert crashed.id == first[-1] and crashed.done_info() is None
    finished = [s for s in plan.stages if s.id in first[:-1]]
    assert finished and all(s.done_info() is not None for s in finished)
    mtimes = {s.id: (s.folder / ex.DONE).stat().st_mtime_ns for s in finished}
    # without --resume the folder is refused
    with pytest.raises(D2maeError, match="--resume"):
        ex.run_experiment(cfg, out, estimate=False)
    calls.clear()
    ex.run_experiment(cfg, out, resume=True, estimate=False)
    assert calls[0] == crashed.id  # finished stages skipped, the interrupted one first
    assert not set(calls) & set(mtimes)
    assert {(s.folder / ex.DONE).stat().st_mtime_ns for s in finished} == set(mtimes.values())
    assert (crashed.folder / "partial").exists()  # a stopped stage keeps its own checkpoint to resume from
    assert all(s.done_info() is not None for s in plan.stages)
    calls.clear()
    ex.run_experiment(cfg, out, resume=True, estimate=False)
    assert calls == []


def test_changed_config_reruns_only_what_changed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls: list[str] = []
    _fake_runners(monkeypatch, calls, crash_on=None)
    ex.run_experiment(ex.load_experiment(write_config(tmp_path / "a.yaml", MICRO)), out, estimate=False)
    calls.clear()
    cfg = ex.load_experiment(write_config(tmp_path / "b.yaml", with_changes(budget__finetune_epochs=2)))
    ex.run_experiment(cfg, out, resume=True, estimate=False)
    assert sorted(c.split(":")[0] for c in calls) == ["finetune", "finetune"]


# ------------------------------------------------------------------------------------------- tables on fixed numbers


def _result(method: str, seed: int, values: dict[str, list[float]]) -> ex.RunResult:
    stage = ex.Stage("finetune", "ds", f"fine-tune {method}", Path(f"/x/{method}-{seed}"), "k", None, seed=seed,
                     method=method)
    folds = {str(i + 1): {k: v[i] for k, v in values.items()} for i in range(len(values["accuracy"]))}
    return ex.RunResult(stage, {"folds": folds})


def _fake_plan(methods: list[str], ablations: list[str] = ()) -> ex.Plan:
    data = with_changes(methods=methods, ablations=list(ablations))
    data["datasets"] = {"ds": data["datasets"]["ph"]}
    cfg = ex.parse_experiment(data, "fixed.yaml")
    return ex.Plan(cfg, Path("/x"), {"ds": None}, [])


def test_table2_bold_best_underlined_second_and_paired_pvalue():
    d2 = {"accuracy": [0.90, 0.92, 0.91, 0.93, 0.89], "macro_f1": [0.88, 0.90, 0.91, 0.92, 0.87],
          "auroc": [0.95, 0.96, 0.94, 0.97, 0.95]}
    mae = {"accuracy": [0.85, 0.88, 0.86, 0.90, 0.84], "macro_f1": [0.84, 0.85, 0.88, 0.90, 0.82],
           "auroc": [0.94, 0.95, 0.95, 0.95, 0.96]}
    sup = {"accuracy": [0.70, 0.72, 0.71, 0.69, 0.70], "macro_f1": [0.65, 0.66, 0.67, 0.64, 0.63],
           "auroc": [0.80, 0.81, 0.79, 0.78, 0.80]}
    results = [_result("supervised", 0, sup), _result("mae", 0, mae), _result("d2mae", 0, d2)]
    plan = _fake_plan(["supervised", "mae", "d2mae"])
    tables = ex.comparison_tables(plan, results)
    md = tables["ds"].to_markdown()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    mean_ci = lambda v: (np.mean(v) * 100, stats.t.ppf(0.975, len(v) - 1) * stats.sem(v) * 100)  # noqa: E731
    m, h = mean_ci(d2["accuracy"])
    assert f"**{m:.2f} ± {h:.2f}**" in rows["D²MAE"]
    m, h = mean_ci(mae["accuracy"])
    assert f"<u>{m:.2f} ± {h:.2f}</u>" in rows["MAE"]
    assert "**" not in rows["ViT (no pre-training)"] and "<u>" not in rows["ViT (no pre-training)"]
    p = stats.ttest_rel(d2["accuracy"], mae["accuracy"]).pvalue
    pcell = rows["P-value (best vs. second)"].split("|")[4].strip()
    assert pcell == ("< 0.001" if p < 0.001 else f"{p:.3f}")
    text = "\n".join(ex.significance_statements(tables))
    assert "ds, ACC: best D²MAE" in text and "significant at 0.05" in text
    p_auc = stats.ttest_rel(d2["auroc"], mae["auroc"]).pvalue
    diff = (np.mean(d2["auroc"]) - np.mean(mae["auroc"])) * 100
    assert p_auc > 0.05 and f"ds, AUROC: best D²MAE, {diff:.2f} points above MAE; P = {p_auc:.3f}" in text
    assert "**not significant**" in text.split("AUROC")[1]


def test_table2_across_seeds_pairs_by_seed_and_fold():
    a = [_result("mae", s, {"accuracy": [0.8 + 0.01 * s, 0.82], "macro_f1": [0.8, 0.8], "auroc": [0.9, 0.9]})
         for s in (0, 1)]
    b = [_result("d2mae", s, {"accuracy": [0.85, 0.86 + 0.01 * s], "macro_f1": [0.8, 0.8], "auroc": [0.9, 0.9]})
         for s in (0, 1)]
    tables = ex.comparison_tables(_fake_plan(["mae", "d2mae"]), a + b)
    acc = tables["ds"].data["columns"]["ACC"]
    assert acc["best"] == "D²MAE" and acc["n_pairs"] == 4
    va = [0.80, 0.82, 0.81, 0.82]
    vb = [0.85, 0.86, 0.85, 0.87]
    assert math.isclose(acc["pvalue"], stats.ttest_rel(vb, va).pvalue)
    # equal F1 everywhere: no significance claim
    text = "\n".join(ex.significance_statements(tables))
    assert "ds, F1: MAE, D²MAE tie (80.00); no method is better here." in text
    assert "significant" not in text.split("ds, F1")[1].split("\n")[0]


def test_table3_ablation_blocks():
    base = {"accuracy": [0.9, 0.9], "auroc": [0.9, 0.9]}
    results = [_result("d2mae", 0, {**base, "macro_f1": [0.90, 0.92]}),
               _result("d2mae-obs-none", 0, {**base, "macro_f1": [0.80, 0.83]}),
               _result("d2mae-obs-fixed-0.5", 0, {**base, "macro_f1": [0.85, 0.86]}),
               _result("d2mae-s1", 0, {**base, "macro_f1": [0.91, 0.93]}),
               _result("d2mae-s3", 0, {**base, "macro_f1": [0.88, 0.89]})]
    plan = _fake_plan(["d2mae"], ["obs_setting", "search_step"])
    md = ex.ablation_tables(plan, results)["ds"].to_markdown()
    assert "(c) OBS settings" in md and "(d) Search step" in md
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    cell = lambda label: next(line for line in lines if f"| {label} |" in line).split("|")[3].strip()  # noqa: E731
    assert cell("With OBS").startswith("**91.00") and cell("Fixed (σ = 0.5)").startswith("<u>85.50")
    assert cell("No blur").startswith("81.50")
    assert cell("s = 1").startswith("**92.00") and cell("s = 2").startswith("<u>91.00")


# ------------------------------------------------------------------------------------------------ end to end (real)


@pytest.mark.slow
def test_micro_experiment_end_to_end_and_resume(tmp_path):
    """~30 phantoms of 32 px, a 2-block ViT, 1 epoch, 2 methods (+ the OBS-setting ablation, which reuses the d2mae
    pre-training): every real stage, the report, then a resume."""
    path = write_config(tmp_path / "micro.yaml", with_changes(ablations=["obs_setting"]))
    out = tmp_path / "out"
    assert cli.main(["experiment", str(path), "--out", str(out), "--no-estimate"]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Results (Table 2 style)" in md and "| ViT (no pre-training) |" in md and "| D²MAE |" in md
    assert "P-value (best vs. second)" in md
    assert "Optimal blurriness search" in md and "Reconstructions of masked inputs" in md
    assert "Ablations (Table 3 style)" in md and "(c) OBS settings" in md and "| Fixed (σ = 0.5) |" in md
    assert "Machine, software and time" in md and "torch" in md
    for png in ("fig2_acc_auroc", "fig3a_obs_ph_1", "fig3b_sigma_per_dataset", "fig3b_sigma_ph_per_scanner",
                "roc_ph", "pretrain_curves_ph", "finetune_curves_ph", "reconstruction_ph_d2mae"):
        assert (out / "figures" / f"{png}.png").is_file(), png
        assert f"figures/{png}.png" in md
    assert html.count("data:image/png;base64,") >= 8 and 'src="figures/' not in html
    rows = list(__import__("csv").DictReader(open(out / "metrics.csv", encoding="utf-8")))
    methods = ("supervised", "d2mae", "d2mae-obs-none", "d2mae-obs-none-t1", "d2mae-obs-fixed-0.5")
    assert {(r["method"], r["fold"]) for r in rows} == {(m, f) for m in methods for f in ("1", "2")}
    assert len(list((out / "pretrained" / "ph").glob("d2mae-seed0-*"))) == 1  # one pre-training, reused
    for name in ("experiment.yaml", "metrics.json", "machine.json", "timings.json", "plan.json"):
        assert (out / name).is_file()
    assert yaml.safe_load((out / "experiment.yaml").read_text())["budget"]["pretrain_epochs"] == 1
    assert json.loads((out / "machine.json").read_text())["cores"] >= 1
    # a second run with --resume skips every stage (DONE markers untouched) and rewrites the report
    plan = ex.make_plan(ex.load_experiment(path), out)
    before = {s.id: (s.folder / ex.DONE).stat().st_mtime_ns for s in plan.stages}
    assert cli.main(["experiment", str(path), "--out", str(out), "--resume", "--no-estimate"]) == 0
    assert {s.id: (s.folder / ex.DONE).stat().st_mtime_ns for s in plan.stages} == before


def test_busbra_config_plans_five_patient_folds(tmp_path):
    cfg = ex.load_experiment(REPO / "configs" / "busbra-cpu.yaml")
    (ds,) = cfg.datasets.values()
    assert ds.protocol == "csv" and ds.folds_csv.endswith("5-fold-cv.csv") and ds.group_column == "Case"
    if not (BUSBRA / "images").is_dir():
        pytest.skip("BUS-BRA data not found beside the repository")
    plan = ex.make_plan(ex.load_experiment(REPO / "configs" / "busbra-cpu.yaml",
                                           [f"datasets.busbra.root={BUSBRA}"]), tmp_path / "out")
    dp = plan.datasets["busbra"]
    assert dp.n_labeled == 1875 and len(dp.folds) == 5 and dp.num_classes == 2
    assert sum(f[3] for f in dp.folds) == 1875  # every image is a test image exactly once
    assert len(plan.of("pretrain")) == 3 and len(plan.of("finetune")) == 4


@pytest.mark.slow
def test_curves_experiment_keeps_checkpoints_subsets_labels_resumes_after_a_kill_and_reports(tmp_path, monkeypatch):
    """budget.checkpoints and budget.label_fractions on a micro budget: the pre-training keeps the model of the half-way
    step, probes read it, the label fraction trains on half of each training fold with the same validation and test
    images, a kill in the middle resumes, and the report has both curves (tables and figures)."""
    data = with_changes(methods=["supervised", "d2mae"], budget__pretrain_epochs=2, budget__checkpoints=[0.5, 1.0],
                        budget__label_fractions=[0.5])
    path = write_config(tmp_path / "curves.yaml", data)
    out = tmp_path / "out"
    real = runner._RUNNERS["label_fraction"]

    def killed(stage, plan):
        raise KeyboardInterrupt

    monkeypatch.setitem(runner._RUNNERS, "label_fraction", killed)
    assert cli.main(["experiment", str(path), "--out", str(out), "--no-estimate"]) != 0  # killed half-way
    monkeypatch.setitem(runner._RUNNERS, "label_fraction", real)
    assert cli.main(["experiment", str(path), "--out", str(out), "--no-estimate", "--resume"]) == 0
    plan = ex.make_plan(ex.load_experiment(path), out)
    assert all(s.done_info() is not None for s in plan.stages)
    (pre,) = plan.of("pretrain")
    total = pre.payload.epochs * (30 // 8)  # 30 phantoms, batch 8: 3 steps per epoch
    kept = pre.folder / "checkpoints" / f"step{round(0.5 * total)}"
    extra = json.loads((kept / "config.json").read_text())["extra"]["pretrain"]
    assert extra["step"] == round(0.5 * total) and extra["images_seen"] == extra["step"] * 8
    probes = {s.share: s for s in plan.of("probe")}
    assert set(probes) == {0.5, 1.0} and Path(probes[0.5].payload.pretrained) == kept
    for share, s in probes.items():
        rows = list(__import__("csv").DictReader(open(s.folder / "probe.csv")))
        assert {r["readout"] for r in rows} == {"linear", "knn"} and {r["fold"] for r in rows} == {"1", "2"}
    half = {s.method: s for s in plan.of("label_fraction")}
    whole = {s.method: s for s in plan.of("finetune")}
    assert set(half) == set(whole) == {"supervised", "d2mae"}
    for m in half:
        a = json.loads((half[m].folder / "run.json").read_text())["fold_details"]
        b = json.loads((whole[m].folder / "run.json").read_text())["fold_details"]
        for fa, fb in zip(a, b):
            assert fa["n_train"] == pytest.approx(fb["n_train"] / 2, abs=2) and fa["n_test"] == fb["n_test"]
        def parts(run):
            rows = __import__("csv").DictReader(open(run / "predictions.csv"))
            return {(r["fold"], r["split"], r["path"]) for r in rows}
        assert parts(half[m].folder) == parts(whole[m].folder)  # the same validation and test images
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Pre-training curves — ph" in md and "## Label efficiency — ph" in md
    assert (out / "figures" / "curves_pretraining_ph.png").is_file()
    assert (out / "figures" / "curves_labels_ph.png").is_file()
    assert "MDE (P < 0.05, 80% power)" in md
    curves = json.loads((out / "metrics.json").read_text())["curves"]
    assert "Pre-training curves — ph" in curves and "Label efficiency — ph" in curves


def test_expected_epochs_with_early_stopping_is_the_mean_over_a_uniform_best_epoch() -> None:
    from d2mae.experiment.estimate import expected_epochs

    # by hand: E = 16, patience 6 → best epoch b = 1..10 runs b + 6 (7..16, sum 115), b = 11..16 runs 16 (96)
    assert expected_epochs(16, 6) == pytest.approx(211 / 16)
    assert expected_epochs(16, 0) == 16 and expected_epochs(5, 9) == 5  # no early stopping; patience past the end
    rng = np.random.default_rng(0)  # Monte Carlo of the same assumption
    assert expected_epochs(30, 4) == pytest.approx(np.minimum(30, rng.integers(1, 31, 200_000) + 4).mean(), rel=0.01)


def test_estimate_decodes_validation_images_once_per_fold_not_per_epoch() -> None:
    """Validation views are decoded once and kept (train.tasks); only training images are decoded every epoch."""
    from types import SimpleNamespace

    from d2mae.experiment.estimate import _downstream_estimate

    dp = SimpleNamespace(folds=[("1", 0, 5, 7)])  # no training images: 5 validation, 7 test
    cfg = SimpleNamespace(epochs=4, patience=0)
    # decoding costs 1 s per file, nothing else costs: 5 validation views once, then 12 images predicted
    assert _downstream_estimate(cfg, dp, step=0, infer=0, augment=0, decode=1, setup=0, truths=0) == 5 + 12
    assert _downstream_estimate(cfg, dp, step=0, infer=0, augment=0, decode=1, setup=0, truths=1) == 2 * (5 + 12)
    # inference every epoch on the validation images, then once on validation and test
    assert _downstream_estimate(cfg, dp, step=0, infer=1, augment=0, decode=0, setup=0, truths=0) == 4 * 5 + 12


def test_estimate_times_each_step_in_the_precision_its_stage_takes() -> None:
    """A bf16 run is timed in bf16, an fp32 one in fp32 (on a CPU with bf16 units ``auto`` takes bf16 for ViT-Tiny
    and up, and a step timed in fp32 overstated it 1.3-1.6×)."""
    import torch

    from d2mae.experiment.estimate import measure_speed
    from d2mae.method.model_config import ModelConfig
    from d2mae.method.models import DeblurClassifier, DeblurMAE

    seen: list[tuple[str, bool]] = []

    def record(module, args):
        if isinstance(module, (DeblurMAE, DeblurClassifier)):
            seen.append((type(module).__name__, torch.is_autocast_enabled("cpu")))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        for pre, fine in (("bf16", "fp32"), ("fp32", "bf16")):
            seen.clear()
            measure_speed(ModelConfig(**TINY), "cpu", 4, 4, 2, [], pretrain_precision=pre,
                          finetune_precision=fine)
            assert {on for name, on in seen if name == "DeblurMAE"} == {pre == "bf16"}, (pre, seen)
            assert {on for name, on in seen if name == "DeblurClassifier"} == {fine == "bf16"}, (fine, seen)
    finally:
        hook.remove()
