"""d2mae probe: the linear probe and kNN are scikit-learn's, fitted on the features the run saved; the features are
the frozen encoder's at each image's t*; partial fine-tuning trains only the last blocks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from d2mae.commands.main import main
from d2mae.data.phantom import generate_phantoms
from d2mae.eval.infer import decode_views
from d2mae.io.artifacts import load_classifier, load_pretrained, save_pretrained
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurClassifier, DeblurMAE
from tests.conftest import TINY


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("probe")
    generate_phantoms(root / "ph", n=40, size=40, seed=3)
    torch.manual_seed(0)
    save_pretrained(DeblurMAE(ModelConfig(**TINY)), root / "pre")
    return root / "ph", root / "pre"


def _probe(data: tuple[Path, Path], out: Path, *extra: str) -> list[dict[str, str]]:
    ph, pre = data
    assert main(["probe", "--pretrained", str(pre), "--labels", str(ph / "labels.csv"), "--out", str(out), "--protocol",
                 "kfold:2", "--knn-k", "5", "--no-progress", "--threads", "1", *extra]) == 0
    return list(csv.DictReader(open(out / "probe.csv")))


@pytest.mark.slow
def test_probe_metrics_are_scikit_learn_run_directly_on_the_saved_features(data, tmp_path: Path) -> None:
    rows = _probe(data, tmp_path / "out")
    saved = np.load(tmp_path / "out" / "features.npz")
    x, y = saved["features"], saved["labels"]
    assert {(r["fold"], r["readout"]) for r in rows} == {(f, k) for f in ("1", "2") for k in ("linear", "knn")}
    for r in rows:
        train, test = saved[f"{r['fold']}/train"], saved[f"{r['fold']}/test"]
        model = (make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)) if r["readout"] == "linear"
                 else KNeighborsClassifier(n_neighbors=5, metric="cosine", weights="distance"))
        p = model.fit(x[train], y[train]).predict_proba(x[test])
        assert float(r["accuracy"]) == pytest.approx(accuracy_score(y[test], p.argmax(1)), abs=1e-6)
        assert float(r["macro_f1"]) == pytest.approx(f1_score(y[test], p.argmax(1), average="macro"), abs=1e-6)
        assert float(r["auroc"]) == pytest.approx(roc_auc_score(y[test], p[:, 1]), abs=1e-6)
    # the features are the frozen encoder's, pooled, at each image's own t* (searched: not all 0)
    t = saved["t_star"]
    assert t.min() >= 1
    mae = load_pretrained(data[1])
    clf = DeblurClassifier(mae.config, 2)
    clf.load_encoder(mae.state_dict())
    views = decode_views([str(r) for r in saved["refs"][:4]], 32, 1)  # [4, 1, 32, 32]
    with torch.no_grad():
        direct = clf.eval().features(views, torch.as_tensor(t[:4], dtype=torch.float32)).numpy()
        sharp = clf.features(views, torch.zeros(4)).numpy()
    np.testing.assert_allclose(x[:4], direct, atol=1e-5)
    assert np.abs(x[:4] - sharp).max() > 1e-3  # t* is not 0: the blur and the token change the features


@pytest.mark.slow
def test_partial_fine_tuning_trains_only_the_last_blocks(data, tmp_path: Path) -> None:
    rows = _probe(data, tmp_path / "out", "--trainable-blocks", "1", "--epochs", "1", "--batch-size", "8",
                  "--warmup-epochs", "0")
    assert {r["readout"] for r in rows} == {"linear", "knn", "partial-1"}
    mae = load_pretrained(data[1])
    clf, _ = load_classifier(tmp_path / "out" / "partial" / "fold_1" / "model", "cpu")
    for name, want in mae.encoder.state_dict().items():
        if name.startswith("norm."):
            continue  # the encoder's final norm is not part of the classifier
        got = clf.encoder.state_dict()[name]
        if name.startswith("blocks.1."):  # the last block of two: trained
            continue
        assert torch.equal(got, want), name  # frozen: the pre-trained value, bit for bit
    changed = [n for n, w in mae.encoder.state_dict().items() if n.startswith("blocks.1.")
               and not torch.equal(clf.encoder.state_dict()[n], w)]
    assert changed, "the last block did not train"
