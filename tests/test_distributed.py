"""More than one process: disjoint shards that add up to one process's batch, ordered gathering, and a real 2-process
DDP pre-training on CPU (gloo) that matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from d2mae.artifacts import load_weights
from d2mae.blur import BlurSchedule
from d2mae.distributed import (DistContext, EpochBatchSampler, eval_indices, gather_ordered, gather_ordered_objects,
                               step_randomness)
from d2mae.errors import D2maeError
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
    schedule = BlurSchedule()
    t1, n1 = step_randomness(0, 1, 5, global_batch=8, num_patches=4, schedule=schedule, rank=0, batch_size=8)
    parts = [step_randomness(0, 1, 5, global_batch=8, num_patches=4, schedule=schedule, rank=r, batch_size=4)
             for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), t1) and torch.equal(torch.cat([p[1] for p in parts]), n1)
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

    from d2mae import distributed as du
    from d2mae.pretrain import _Run, make_config

    ctx, device = du.init_distributed("cpu")
    try:
        # gather_ordered: 5 items over 2 ranks (rank 1 pads), back in order with no duplicates
        idx = du.eval_indices(5, ctx)
        gathered = du.gather_ordered(torch.tensor(idx) * 10, 5, ctx)
        objects = du.gather_ordered_objects([f"item{i}" for i in idx], 5, ctx)
        # pre-training: record which images this rank saw, and its final weights
        run = _Run(make_config(**options), ctx, device)
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


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two workers: tiny models, and no OpenMP waits on a busy 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, one_thread):
    from d2mae.pretrain import make_config, pretrain
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
    assert {p.name for p in ddp_out.iterdir()} == {"model.safetensors", "config.json", "pretrain.yaml", "pretrain_hashes.txt",
                                                  "metrics.jsonl", "resume.pt"}
    steps = [json.loads(line)["step"] for line in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    resume = torch.load(ddp_out / "resume.pt", weights_only=True)
    assert resume["world_size"] == 2 and resume["config"]["batch_size"] == 4
