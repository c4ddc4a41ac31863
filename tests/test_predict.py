"""Prediction on new images: OBS with the bundled pre-trained model, then the classifier at each image's t*."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from d2mae.commands.main import main
from d2mae.eval.infer import class_probabilities
from d2mae.eval.obs import run_obs
from d2mae.eval.predict import predict
from d2mae.io.artifacts import load_pretrained, model_sha256, save_classifier
from d2mae.method.models import build_classifier
from d2mae.method.obs import ObsSpec
from d2mae.runtime.errors import D2maeError
from tests.test_obs import make_images, make_pretrained

CLASSES = ["benign", "malignant", "other"]



def make_finetuned(folder: Path, pre: Path, seed: int, obs: dict | None = None) -> Path:
    """A fine-tuned model folder as `d2mae finetune` writes it (random head, pre-trained encoder)."""
    mae = load_pretrained(pre)
    torch.manual_seed(seed)
    clf = build_classifier(mae.config, len(CLASSES), "full", 0.0)
    clf.load_encoder(mae.state_dict())
    torch.nn.init.normal_(clf.head.weight)
    return save_classifier(clf, folder, CLASSES, ObsSpec.from_dict(obs or {"mode": "search"}),
                           {"mode": "full"}, pre, model_sha256(pre))


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    pre = make_pretrained(tmp_path / "pre")
    run = tmp_path / "run"
    for k in ("1", "2"):
        make_finetuned(run / f"fold_{k}" / "model", pre, seed=int(k))
    (run / "run.json").write_text(json.dumps({"classes": CLASSES, "folds": ["1", "2"]}))
    refs = make_images(tmp_path / "new" / "sub", 9)
    return run, pre, refs


def test_predict_runs_obs_then_classifies_at_t_star(run_dir) -> None:
    run, pre, refs = run_dir
    result = predict(run / "fold_1" / "model", [str(Path(refs[0]).parent.parent)], device="cpu", progress=False)
    assert result.paths == sorted(refs) and result.classes == CLASSES
    table = run_obs(load_pretrained(pre), result.paths, spec=ObsSpec("search", 2), progress=False)
    assert result.t_star.tolist() == table.t_star.tolist()
    assert result.sigma_star.tolist() == table.sigma_star.tolist()
    from d2mae.io.artifacts import load_classifier

    clf, _ = load_classifier(run / "fold_1" / "model")
    expected = class_probabilities(clf, result.paths, table.t_star, torch.device("cpu"))
    np.testing.assert_allclose(result.probs, expected, atol=1e-6)
    np.testing.assert_allclose(result.probs.sum(1), 1, atol=1e-6)
    single = predict(run / "fold_1" / "model", [refs[2]], device="cpu", progress=False)
    i = result.paths.index(refs[2])
    np.testing.assert_allclose(single.probs[0], result.probs[i], atol=1e-5)


def test_sharp_predict_classifies_the_deterministic_view_at_t_star(run_dir, monkeypatch) -> None:
    """predict feeds the classifier OBS's deterministic view of each new image (the same pixels to 1e-6) and t*."""
    from d2mae.data.dataset import center_box, resize_box
    from d2mae.data.decode import load_image
    from d2mae.method.models import DeblurClassifier

    run, pre, refs = run_dir
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = DeblurClassifier.forward

    def spy(self, x, t):
        calls.append((x.detach().clone(), t.detach().clone()))
        return original(self, x, t)

    monkeypatch.setattr(DeblurClassifier, "forward", spy)
    result = predict(run / "fold_1" / "model", refs, device="cpu", progress=False)
    xs = torch.cat([x for x, _ in calls])
    ts = torch.cat([t for _, t in calls])
    assert xs.shape[0] == len(result.paths)
    for i, ref in enumerate(result.paths):
        a = load_image(ref)
        view = torch.from_numpy(resize_box(a, center_box(*a.shape[:2]), 32))
        assert float((xs[i] - view).abs().max()) <= 1e-6
        assert float(ts[i]) == result.t_star[i] >= 1  # searched: t ≥ 1


def test_a_run_folder_averages_its_folds(run_dir) -> None:
    run, _, refs = run_dir
    both = predict(run, refs, device="cpu", progress=False)
    one = predict(run / "fold_1" / "model", refs, device="cpu", progress=False)
    two = predict(run / "fold_2" / "model", refs, device="cpu", progress=False)
    np.testing.assert_allclose(both.probs, (one.probs + two.probs) / 2, atol=1e-6)
    assert len(both.models) == 2
    np.testing.assert_allclose(predict(run, refs, fold="2", device="cpu", progress=False).probs, two.probs)


def test_predict_command_prints_and_writes_csv(run_dir, tmp_path: Path, capsys) -> None:
    run, _, refs = run_dir
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(run), str(Path(refs[0]).parent), "--out", str(out), "--workers", "0",
                 "--show", "3"]) == 0
    printed = capsys.readouterr().out
    assert "img00.png" in printed and "… 6 more row(s)" in printed
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "pred", "prob_benign", "prob_malignant", "prob_other", "t_star", "sigma_star"]
    assert len(rows) == 9 and all(r["pred"] in CLASSES for r in rows)


def test_fixed_and_none_obs_settings_are_honoured(tmp_path: Path) -> None:
    pre = make_pretrained(tmp_path / "pre")
    refs = make_images(tmp_path / "i", 3)
    fixed = make_finetuned(tmp_path / "fixed", pre, 0, {"mode": "fixed", "sigma": 0.5, "search_step": None})
    none = make_finetuned(tmp_path / "none", pre, 0, {"mode": "none", "sigma": None, "search_step": None})
    assert predict(fixed, refs, device="cpu", progress=False).sigma_star.tolist() == [0.5] * 3
    assert predict(none, refs, device="cpu", progress=False).t_star.tolist() == [0] * 3


def test_bad_model_folders(run_dir, tmp_path: Path, capsys) -> None:
    run, pre, refs = run_dir
    with pytest.raises(D2maeError, match="neither a fine-tuned model folder"):
        predict(tmp_path, refs)
    with pytest.raises(D2maeError, match="has no fold 7"):
        predict(run, refs, fold="7")
    with pytest.raises(D2maeError, match="expected a 'd2mae-classifier' folder"):
        predict(pre, refs)
    other = make_pretrained(tmp_path / "other", seed=9)
    target = run / "fold_1" / "model" / "pretrained" / "model.safetensors"
    target.unlink()
    target.write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(D2maeError, match="is not the pre-trained model this model was trained from"):
        predict(run / "fold_1" / "model", refs)
    assert main(["predict", "--model", str(run / "fold_2" / "model")]) == 2
    assert "no images given" in capsys.readouterr().err
