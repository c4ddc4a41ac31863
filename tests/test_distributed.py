"""More than one process: disjoint shards that add up to one process's batch, ordered gathering, and real 2-process
DDP runs on CPU (gloo) — pre-training, OBS, fine-tuning, prediction — that match one process with the same global
batch."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from d2mae.data.sampler import EpochBatchSampler
from d2mae.io.artifacts import load_weights
from d2mae.runtime.distributed import DistContext, eval_indices, gather_ordered, gather_ordered_objects
from d2mae.runtime.errors import D2maeError
from d2mae.train.batches import step_randomness
from tests.conftest import TINY


def test_shards_are_disjoint_and_add_up_to_the_single_process_batch():
    single = EpochBatchSampler(50, batch_size=6, seed=3, rank=0, world_size=1)
    ranks = [EpochBatchSampler(50, batch_size=3, seed=3, rank=r, world_size=2) for r in range(2)]
    assert single.micro_steps == ranks[0].micro_steps == 8  # drop_last: 50 // 6
    for s in [single, *ranks]:
        s.set_epoch(4)
    for one, a, b in zip(single, *ranks):
        assert not {i for i, _ in a} & {i for i, _ in b}  # disjoint
        assert a + b == one  # same images, same augmentation seeds, rank 0's first
    # another epoch, another order; the same epoch, the same order
    assert single.permutation(4).tolist() == single.permutation(4).tolist()
    assert single.permutation(4).tolist() != single.permutation(5).tolist()


def test_weighted_epochs_are_sliced_like_permutations_and_repeats_get_their_own_seeds():
    weights = [1.0] * 10 + [10.0] * 2  # the last two images (a rare class) weigh as much as the other ten
    single = EpochBatchSampler(12, batch_size=6, seed=1, weights=weights)
    ranks = [EpochBatchSampler(12, batch_size=3, seed=1, rank=r, world_size=2, weights=weights) for r in range(2)]
    for s in [single, *ranks]:
        s.set_epoch(3)
    pairs = []
    for one, a, b in zip(single, *ranks):
        assert a + b == one  # the same draw, sliced per rank
        pairs += one
    drawn = single.permutation(3)  # [12], with replacement
    assert drawn.bincount(minlength=12)[10:].sum() > 2 and len(set(drawn.tolist())) < 12
    seeds = {}
    for i, seed in pairs:
        seeds.setdefault(i, set()).add(seed)
    assert any(len(v) > 1 for v in seeds.values())  # an image drawn twice is augmented twice differently


def test_the_last_partial_batch_can_be_kept_and_is_split_evenly():
    single = EpochBatchSampler(23, batch_size=8, seed=2, min_last=2)
    ranks = [EpochBatchSampler(23, batch_size=4, seed=2, rank=r, world_size=2, min_last=2) for r in range(2)]
    assert single.micro_steps == ranks[0].micro_steps == 3 and ranks[1].step_size(2) == 7
    for s in [single, *ranks]:
        s.set_epoch(0)
    batches = list(zip(single, *ranks))  # (one process, rank 0, rank 1) per step
    assert [(len(a), len(b)) for _, a, b in batches] == [(4, 4), (4, 4), (4, 3)]  # 7 left: 4 + 3
    assert all(a + b == one for one, a, b in batches)
    assert sorted(i for one, _, _ in batches for i, _ in one) == list(range(23))  # every image once
    assert EpochBatchSampler(17, batch_size=8, seed=0, min_last=2).micro_steps == 2  # one image left: dropped
    assert EpochBatchSampler(17, batch_size=8, seed=0).micro_steps == 2


def test_resume_position_skips_the_steps_already_done():
    s = EpochBatchSampler(40, batch_size=4, seed=0)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=6)
    assert len(s) == 4 and list(s) == full[6:]


def test_accumulation_rounds_the_epoch_to_whole_optimizer_steps():
    assert EpochBatchSampler(50, batch_size=4, seed=0, steps_multiple=3).micro_steps == 12  # 12 // 3 * 3
    with pytest.raises(D2maeError, match="--batch-size"):
        EpochBatchSampler(10, batch_size=4, seed=0, world_size=2, steps_multiple=2)


def test_blur_levels_and_masks_do_not_depend_on_the_rank_layout():
    from d2mae.method.diffmae import DiffMAE
    from d2mae.method.moco import MoCoV3
    from d2mae.method.model_config import ModelConfig
    from d2mae.method.models import DeblurMAE

    small = dict(arch="vit_tiny_patch16", img_size=32, depth=1, embed_dim=32, num_heads=2, decoder_embed_dim=16,
                 decoder_depth=1, decoder_num_heads=2)
    plain = dict(small, blur=False, blur_embed="none")
    for model in (DeblurMAE(ModelConfig(**small)), MoCoV3(ModelConfig(**plain, objective="moco-v3", moco_dim=8,
                                                                        moco_mlp_dim=8)),
                  DiffMAE(ModelConfig(**plain, objective="diffmae", loss_on="masked"))):
        whole = step_randomness(model, 0, 1, 5, global_batch=8, rank=0, batch_size=8)
        parts = [step_randomness(model, 0, 1, 5, global_batch=8, rank=r, batch_size=4) for r in range(2)]
        for key, value in whole.items():
            assert torch.equal(torch.cat([p[key] for p in parts]), value), (type(model).__name__, key)
    t1 = step_randomness(DeblurMAE(ModelConfig(**small)), 0, 1, 5, global_batch=8, rank=0, batch_size=8)["t"]
    assert t1.min() >= 1 and t1.max() <= 11  # t ~ U{1..T}


def test_eval_indices_cover_every_item_once_after_gathering():
    n, world = 7, 3
    blocks = [eval_indices(n, DistContext(rank=r, world_size=world)) for r in range(world)]
    assert all(len(b) == 3 for b in blocks)  # padded to equal length
    assert [i for b in blocks for i in b][:n] == list(range(n))
    single = DistContext()
    assert torch.equal(gather_ordered(torch.arange(n), n, single), torch.arange(n))
    assert gather_ordered_objects(["a", "b"], 2, single) == ["a", "b"]


# ---- a real two-process run ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, options: dict, result_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from d2mae.runtime import distributed as du
    from d2mae.train.pretrain import Pretrainer
    from d2mae.train.pretrain_config import make_config

    ctx, device = du.init_distributed("cpu")
    try:
        # gather_ordered: 5 items over 2 ranks (rank 1 pads), back in order with no duplicates
        idx = du.eval_indices(5, ctx)
        gathered = du.gather_ordered(torch.tensor(idx) * 10, 5, ctx)
        objects = du.gather_ordered_objects([f"item{i}" for i in idx], 5, ctx)
        # pre-training: record which images this rank saw, and its final weights
        run = Pretrainer(make_config(**options), ctx, device)
        assert run.setup()
        seen = [i for epoch in range(run.cfg.epochs) for i in _epoch_indices(run.sampler, epoch)]
        run.train()
        save_file({k: v.contiguous() for k, v in run.model.state_dict().items()},
                  f"{result_dir}/rank{rank}.safetensors")
        Path(f"{result_dir}/rank{rank}.json").write_text(json.dumps(
            {"gathered": gathered.tolist(), "objects": objects, "seen": seen}))
    finally:
        du.shutdown()


def _epoch_indices(sampler: EpochBatchSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return [i for batch in sampler for i, _ in batch]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    from d2mae.train.pretrain import pretrain
    from d2mae.train.pretrain_config import make_config
    from tests.test_pretrain import write_images

    images = write_images(tmp_path / "images", 32)
    common = dict(TINY, data=[str(images)], epochs=2, lr=1e-3, warmup_epochs=0.5, num_workers=0,
                  data_path="loader", log_every_steps=1, device="cpu", save_every_epochs=100)
    results = tmp_path / "results"
    results.mkdir()
    ddp_out = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, _free_port(), {**common, "out": str(ddp_out), "batch_size": 4}, str(results)),
             nprocs=2, join=True)
    single_out = pretrain(make_config(**common, out=str(tmp_path / "single"), batch_size=8))

    r0, r1 = (load_weights(results / f"rank{r}.safetensors") for r in range(2))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP kept the ranks identical
    single = load_weights(single_out / "model.safetensors")
    diff = torch.cat([(r0[k] - single[k]).abs().flatten() for k in r0])
    # one process with batch 8 == two processes with batch 4 each, up to float rounding (which Adam's division by
    # √v can enlarge to a fraction of one step, lr = 1e-3, on the few weights whose gradients are ~0)
    assert diff.mean() < 1e-7 and diff.max() < 1e-4, (diff.mean(), diff.max())
    ddp_loss = [json.loads(line)["loss"] for line in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    one_loss = [json.loads(line)["loss"] for line in (single_out / "metrics.jsonl").read_text().splitlines()]
    assert ddp_loss == pytest.approx(one_loss, abs=1e-5)
    assert all(torch.equal(r0[k], v) for k, v in load_weights(ddp_out / "model.safetensors").items())

    info = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert info[0]["gathered"] == info[1]["gathered"] == [0, 10, 20, 30, 40]
    assert info[0]["objects"] == [f"item{i}" for i in range(5)]
    seen0, seen1 = info[0]["seen"], info[1]["seen"]
    assert len(seen0) == len(seen1) == 2 * 16  # 4 steps per epoch × batch 4, two epochs
    for epoch in range(2):  # within an epoch the ranks' images are disjoint
        assert not set(seen0[epoch * 16:(epoch + 1) * 16]) & set(seen1[epoch * 16:(epoch + 1) * 16])

    # only rank 0 wrote: one set of files, every step logged once
    assert {p.name for p in ddp_out.iterdir()} == {"model.safetensors", "config.json", "pretrain.yaml",
                                                  "pretrain_hashes.txt", "metrics.jsonl", "resume.pt", "tensorboard"}
    assert len(list((ddp_out / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    steps = [json.loads(line)["step"] for line in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    resume = torch.load(ddp_out / "resume.pt", weights_only=True)
    assert resume["world_size"] == 2 and resume["config"]["batch_size"] == 4


# ---- OBS, fine-tuning and prediction under DDP --------------------------------------------------------------------

def _commands_worker(rank: int, world: int, port: int, commands: list[list[str]], result_dir: str) -> None:
    """One rank: run the d2mae ``commands`` in order; record the first fine-tuning's training images and weights."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from d2mae.commands.main import main
    from d2mae.data.dataset import SeededDataset
    from d2mae.method.models import GlobalBatchNorm1d
    from d2mae.runtime import distributed as du
    from d2mae.train import tasks

    du.init_distributed("cpu")
    try:
        seen, spy = _training_image_spy()
        SeededDataset.__getitem__ = spy  # this process only
        states: list[dict[str, torch.Tensor]] = []
        tasks.class_probabilities = _recording_predict(states)
        seen_first: list[int] = []  # the images of the first fine-tuning
        for args in commands:
            assert main(args) == 0
            if args[0] == "finetune" and not seen_first:
                seen_first = list(seen)
                save_file(states[1], f"{result_dir}/rank{rank}.safetensors")  # after epoch 2's training
        # the linear probe's BatchNorm: each rank normalises half of a batch as one BatchNorm does the whole batch
        feats = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))  # [6, D], the same on both ranks
        bn, ref = GlobalBatchNorm1d(5, affine=False), torch.nn.BatchNorm1d(5, affine=False)
        part = bn(feats[3 * rank:3 * rank + 3])  # [3, D]
        whole = ref(feats)[3 * rank:3 * rank + 3]
        bn_same = bool(torch.allclose(part, whole, atol=1e-5) and torch.allclose(bn.running_mean, ref.running_mean)
                       and torch.allclose(bn.running_var, ref.running_var))
        Path(f"{result_dir}/rank{rank}.json").write_text(json.dumps({"seen": seen_first, "bn_same": bn_same}))
    finally:
        du.shutdown()


def _recording_predict(states: list[dict[str, torch.Tensor]]) -> Any:
    """A replacement for the fold trainer's ``class_probabilities`` that first appends a copy of the model's weights
    to ``states`` (fine-tuning calls it after each epoch, then with the best epoch's weights for val and test)."""
    from d2mae.train import tasks

    real = tasks.class_probabilities

    def predict(model, *args, **kwargs):
        states.append({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    return predict


def _training_image_spy() -> tuple[list[int], Any]:
    """A replacement for ``SeededDataset.__getitem__`` that appends each training image's index to the list."""
    from d2mae.data.dataset import SeededDataset

    seen: list[int] = []
    original = SeededDataset.__getitem__

    def spy(self, key):
        seen.append(int(key[0]))
        return original(self, key)

    return seen, spy


def _files(folder: Path) -> list[str]:
    """Every file under ``folder``, relative; TensorBoard event files (names with host and time) as ``…/events``."""
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(str(Path(n).parent / "events") if "tfevents" in n else n for n in names)


@pytest.mark.slow
def test_two_process_obs_finetune_and_predict_match_one_process(tmp_path, monkeypatch):
    from d2mae.commands.main import main
    from d2mae.data.dataset import SeededDataset
    from d2mae.train import tasks
    from tests.test_labels import write_labeled
    from tests.test_obs import make_pretrained

    pre, labels = make_pretrained(tmp_path / "pre"), write_labeled(tmp_path / "d", n=36, size=24)
    common = ["finetune", "--pretrained", str(pre), "--labels", str(labels), "--protocol", "split:3:1:1",
              "--epochs", "2", "--warmup-epochs", "1", "--augment", "none", "--drop-path", "0", "--workers", "0",
              "--device", "cpu", "--no-progress", "--blr", "5e-2"]
    obs = ["obs", "--pretrained", str(pre), "--labels", str(labels), "--workers", "0", "--strips", "0", "--device",
           "cpu"]
    results = tmp_path / "results"
    results.mkdir()
    linear = [*common, "--mode", "linear", "--obs", "none", "--epochs", "1", "--blr", "1.0"]  # SGD, BatchNorm
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    predict = ["predict", str(tmp_path / "d" / "img"), "--workers", "0", "--device", "cpu", "--no-progress"]
    commands = [[*obs, "--out", str(tmp_path / "obs_ddp")], [*common, "--out", str(ddp), "--batch-size", "4"],
                [*linear, "--out", str(ddp / "lin"), "--batch-size", "4"],
                [*predict, "--model", str(ddp), "--out", str(tmp_path / "predict_ddp.csv")]]
    mp.spawn(_commands_worker, args=(2, _free_port(), commands, str(results)), nprocs=2, join=True)
    assert main([*obs, "--out", str(tmp_path / "obs_single")]) == 0
    seen, spy = _training_image_spy()
    monkeypatch.setattr(SeededDataset, "__getitem__", spy)
    states: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(tasks, "class_probabilities", _recording_predict(states))
    assert main([*common, "--out", str(single), "--batch-size", "8"]) == 0
    seen = list(seen)  # the full fine-tuning's images
    assert main([*linear, "--out", str(single / "lin"), "--batch-size", "8"]) == 0
    assert main([*predict, "--model", str(single), "--out", str(tmp_path / "predict_single.csv")]) == 0

    # d2mae obs: every image searched once, the same table as one process
    table = {p: _rows_by_path(tmp_path / p / "obs.csv") for p in ("obs_ddp", "obs_single")}
    assert table["obs_ddp"].keys() == table["obs_single"].keys() and len(table["obs_ddp"]) == 36
    for path, row in table["obs_single"].items():
        assert table["obs_ddp"][path]["t_star"] == row["t_star"]
        assert float(table["obs_ddp"][path]["loss_t1"]) == pytest.approx(float(row["loss_t1"]), rel=1e-5)
    assert _files(tmp_path / "obs_ddp") == _files(tmp_path / "obs_single")

    # after 2 epochs (6 steps, 2 of them with the epoch's last 4 images split 2 + 2) the ranks hold the same
    # weights, and those of one process with batch 8; so does the saved model (the best epoch's)
    r0, r1 = (load_weights(results / f"rank{r}.safetensors") for r in range(2))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    moved = max(float((states[1][k] - states[0][k]).abs().max()) for k in r0)  # epoch 2 changed the weights
    diff = max(float((r0[k] - states[1][k]).abs().max()) for k in r0)
    assert diff < 1e-4 < moved, (diff, moved)
    saved, one = (load_weights(p / "fold_1" / "model" / "classifier.safetensors") for p in (ddp, single))
    assert max(float((saved[k] - one[k]).abs().max()) for k in one) < 1e-4
    preds = {p: _rows_by_path(p / "predictions.csv") for p in (ddp, single)}
    assert preds[ddp].keys() == preds[single].keys()
    for path, row in preds[single].items():
        for key in ("prob_benign", "prob_malignant"):
            assert float(preds[ddp][path][key]) == pytest.approx(float(row[key]), abs=1e-4)
        assert preds[ddp][path]["t_star"] == row["t_star"]  # the OBS inside fine-tuning, sharded
    ddp_log, one_log = ([json.loads(x) for x in (p / "fold_1" / "metrics.jsonl").read_text().splitlines()]
                        for p in (ddp, single))
    assert [x["train_loss"] for x in ddp_log] == pytest.approx([x["train_loss"] for x in one_log], abs=1e-5)
    assert [x["val_macro_f1"] for x in ddp_log] == [x["val_macro_f1"] for x in one_log]
    run = {p: json.loads((p / "run.json").read_text())["finetune"] for p in (ddp, single)}
    assert run[ddp]["world_size"] == 2 and run[ddp]["lr"] == run[single]["lr"]  # lr follows the global batch 8

    # each step: the ranks' images are disjoint and together the single process's batch (rank 0's slice first)
    info = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    s0, s1 = info[0]["seen"], info[1]["seen"]
    per_rank = [4, 4, 2] * 2  # 20 training images: global batches of 8, 8 and the epoch's last 4; two epochs
    assert len(seen) == 2 * 20 and len(s0) == len(s1) == sum(per_rank)
    at = 0
    for k in per_rank:
        a, b = s0[at:at + k], s1[at:at + k]
        assert not set(a) & set(b)
        assert a + b == seen[2 * at:2 * at + 2 * k]
        at += k
    assert info[0]["bn_same"] and info[1]["bn_same"]

    # the linear probe: the global batch's BatchNorm statistics, so the head and running statistics match too
    lin_ddp, lin_one = (load_weights(p / "lin" / "fold_1" / "model" / "classifier.safetensors") for p in (ddp, single))
    for key in ("head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"):
        assert torch.allclose(lin_ddp[key], lin_one[key], atol=1e-5), key
    assert not torch.equal(lin_one["head.0.running_mean"], torch.zeros_like(lin_one["head.0.running_mean"]))

    # d2mae predict: OBS and the classifier sharded, every image once, as one process
    new = {p: _rows_by_path(tmp_path / f"predict_{p}.csv") for p in ("ddp", "single")}
    assert new["ddp"].keys() == new["single"].keys() and len(new["ddp"]) == 36
    for path, row in new["single"].items():
        assert float(new["ddp"][path]["prob_benign"]) == pytest.approx(float(row["prob_benign"]), abs=1e-4)
        assert new["ddp"][path]["t_star"] == row["t_star"]

    # only rank 0 wrote: the same files as one process
    assert _files(ddp) == _files(single)


def _rows_by_path(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}
