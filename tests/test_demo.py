"""`d2mae demo`: the packaged demo config is the repository's, it plans all four Table-2 methods on phantoms under
one budget, and the command runs it into ./d2mae-demo by default and ends by printing the report's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2mae import experiment as ex
from d2mae.commands import main as cli
from d2mae.experiment import demo
from tests.conftest import REPO


def test_packaged_demo_config_is_the_repository_one():
    packaged = demo.demo_config()
    assert packaged.parent.name == "configs" and packaged.parent.parent.name == "d2mae"
    assert packaged.read_bytes() == (REPO / "configs" / "demo.yaml").read_bytes()


@pytest.mark.parametrize("quick", [False, True])
def test_demo_plans_the_four_table2_methods_on_phantoms(tmp_path, quick):
    cfg = ex.load_experiment(demo.demo_config(), demo.QUICK_OVERRIDES if quick else ())
    assert cfg.methods == ["supervised", "mae", "deblurrmae", "d2mae"]
    assert cfg.model["arch"] == "vit_tiny_patch16" and cfg.model["img_size"] <= 96
    (ds,) = cfg.datasets.values()
    assert ds.phantoms is not None and ds.pretrain_phantoms is not None
    assert ds.protocol.startswith("kfold:") and int(ds.protocol.split(":")[1]) >= 3  # CIs and P-values need folds
    plan = ex.make_plan(cfg, tmp_path / "d2mae-demo")  # checks the equal-budget rule too
    assert {s.method for s in plan.of("finetune")} == set(ex.TABLE2_METHODS)
    assert {s.preset for s in plan.of("pretrain")} == {"mae", "deblurrmae", "d2mae"}
    assert all(s.payload.data[0].startswith(str(tmp_path / "d2mae-demo" / "data")) for s in plan.of("pretrain"))
    if quick:
        full = ex.load_experiment(demo.demo_config())
        assert cfg.budget.pretrain_epochs < full.budget.pretrain_epochs
        assert ds.phantoms["n"] < full.datasets["phantoms"].phantoms["n"]


def test_demo_command_runs_into_d2mae_demo_and_prints_the_report_path(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run(cfg, out, resume=False, estimate=True):
        seen.update(cfg=cfg, out=Path(out), resume=resume, estimate=estimate)
        path = Path(out) / "report.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# report\n")
        return path

    monkeypatch.setattr(demo, "run_experiment", fake_run)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo"]) == 0
    assert seen["out"] == Path("d2mae-demo") and seen["resume"] and seen["cfg"].name == "demo"
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(Path("d2mae-demo") / "report.html")
    assert cli.main(["demo", "--out", str(tmp_path / "elsewhere"), "--quick", "--no-estimate"]) == 0
    assert seen["out"] == tmp_path / "elsewhere" and seen["cfg"].name == "demo-quick" and not seen["estimate"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "elsewhere" / "report.html")


def test_demo_help_says_where_it_writes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "./d2mae-demo" in text and "--quick" in text
