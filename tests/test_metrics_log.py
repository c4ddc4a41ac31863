"""metrics.jsonl always, TensorBoard event files when tensorboard is installed; resume trims both."""

import json
import sys

import pytest

from d2mae.runtime.errors import D2maeError
from d2mae.runtime.logs import MetricsLog, tensorboard_writer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(log_dir, tag):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_go_to_jsonl_and_tensorboard(tmp_path):
    with MetricsLog(tmp_path / "metrics.jsonl", "step", "auto", tmp_path / "tb", tag="pretrain") as log:
        for step in (1, 2, 3):
            log.write({"step": step, "epoch": 1, "loss": 1.0 / step, "lr": 1e-3, "note": "text", "nan": float("nan")})
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert scalars(tmp_path / "tb", "pretrain/loss") == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6))]
    tags = EventAccumulator(str(tmp_path / "tb"))
    tags.Reload()
    assert set(tags.Tags()["scalars"]) == {"pretrain/epoch", "pretrain/loss", "pretrain/lr"}  # numbers only


def test_resume_drops_the_interrupted_stretch_from_both(tmp_path):
    path, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    with MetricsLog(path, "epoch", "on", tb, tag="fold_1") as log:
        for epoch in (1, 2, 3):
            log.write({"epoch": epoch, "train_loss": float(epoch)})
    with open(path, "a") as fh:
        fh.write('{"epoch": 4, "train_lo')  # a killed run's half-written line
    with MetricsLog(path, "epoch", "on", tb, resume_at=2, tag="fold_1") as log:  # resumed after epoch 2
        assert [r["epoch"] for r in lines(path)] == [1, 2]
        log.write({"epoch": 3, "train_loss": 30.0})
    assert [r["train_loss"] for r in lines(path)] == [1.0, 2.0, 30.0]
    assert scalars(tb, "fold_1/train_loss") == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_new_run_starts_an_empty_log_and_off_writes_no_events(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 1}\n')
    with MetricsLog(path, "step", "off") as log:
        log.write({"step": 1, "loss": 2.0})
    assert lines(path) == [{"step": 1, "loss": 2.0}]
    assert not (tmp_path / "tensorboard").exists()


def test_without_tensorboard_auto_skips_and_on_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert tensorboard_writer("auto", tmp_path) is None
    with pytest.raises(D2maeError, match=r"tensorboard: is on, but the tensorboard package is not installed.*"
                                         r"d2mae\[tensorboard\]"):
        tensorboard_writer("on", tmp_path)
    with pytest.raises(D2maeError, match="tensorboard: unknown value 'yes'"):
        tensorboard_writer("yes", tmp_path)
