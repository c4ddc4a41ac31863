"""Tar shards for corpora larger than memory: written losslessly, read with one seek, streamed per rank.

Phantoms are written to shards; the tests check that an image read from a shard is the original file (bytes,
pixels, content hash, crops: the sharpness bound of docs/views.md holds trivially), that over the processes of a
torchrun every image is seen once per epoch while each process reads and caches only its own share, and that a
resumed run continues at the right sample.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from d2mae.commands import main as cli
from d2mae.data.dataset import ImageDataset, SeededDataset
from d2mae.data.decode import content_hash, load_image
from d2mae.data.phantom import generate_phantoms
from d2mae.data.sampler import ShardShareSampler, rank_share
from d2mae.data.shard_writer import ShardsConfig, make_shards
from d2mae.data.shards import INDEX, ShardSet, read_member, split_member
from d2mae.data.sharpness import equivalent_sigma
from d2mae.data.sources import find_images
from d2mae.io.artifacts import load_weights
from d2mae.runtime.errors import D2maeError
from tests.conftest import TINY
from tests.test_distributed import _free_port


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpus")
    generate_phantoms(root / "ph", n=48, size=48, seed=3)
    make_shards(ShardsConfig(sources=[str(root / "ph" / "images")], out=str(root / "shards"), shard_size=10,
                             progress=False))
    return root / "ph" / "images", root / "shards"


def test_an_image_in_a_shard_is_the_original_file(corpus):
    images, shards = corpus
    s = ShardSet.open(shards)
    assert len(s.refs) == 48 and s.shard_sizes == [10, 10, 10, 10, 8]
    assert find_images([shards]) == s.refs  # --data DIR of any command
    for ref, source, digest in zip(s.refs, s.sources, s.hashes):
        assert read_member(ref) == Path(source).read_bytes()
        assert content_hash(ref) == content_hash(source) == digest  # the fine-tuning leak guard sees the original
        assert (load_image(ref) == load_image(source)).all()
    order = [Path(src).name for src in s.sources]
    assert order != sorted(order)  # shuffled into the shards: each shard is a sample of the corpus
    assert "shard_size: 10" in (shards / "shards_config.yaml").read_text()  # the resolved config, beside the output


def test_crops_from_shards_are_the_crops_of_the_original(corpus):
    _, shards = corpus
    s = ShardSet.open(shards)
    from_shards = SeededDataset(ImageDataset(s.refs, 32, augment="mae"))
    from_files = SeededDataset(ImageDataset(s.sources, 32, augment="mae"))
    for i in (0, 17, 47):
        a, b = from_shards[(i, 1234 + i)][0], from_files[(i, 1234 + i)][0]
        assert torch.equal(a, b) and abs(equivalent_sigma(a, b)) <= 0.1  # docs/views.md's bound, met exactly


def test_a_shard_set_is_not_overwritten_and_a_truncated_shard_is_one_line(corpus, tmp_path):
    images, shards = corpus
    with pytest.raises(D2maeError, match="already holds a shard set"):
        make_shards(ShardsConfig(sources=[str(images)], out=str(shards)))
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    tar = copy / "shard-00001.tar"
    ref = ShardSet.open(copy).refs[10]
    tar.write_bytes(tar.read_bytes()[:700])
    with pytest.raises(D2maeError, match="truncated"):  # cut while a run reads it
        load_image(ref)
    assert split_member(ref)[0] == str(tar)
    with pytest.raises(D2maeError, match=r"shards\[1\]\.samples\[0\].*does not lie inside shard-00001.tar"):
        ShardSet.open(copy)  # cut before: refused when the set is opened


def test_every_image_once_per_epoch_across_ranks_and_reads_stay_in_a_shard(corpus):
    _, shards = corpus
    n, world, batch = 48, 2, 4
    for epoch in range(3):
        seen = []
        for rank in range(world):
            share = rank_share(n, rank, world)
            sampler = ShardShareSampler(share.stop - share.start, n // world, batch, seed=0, rank=rank, window=10)
            sampler.set_epoch(epoch)
            local = [[i for i, _ in b] for b in sampler]
            assert len(local) == 6
            for b in local:  # a batch reads from at most two windows of 10 consecutive images: sequential reads
                assert len({i // 10 for i in b}) <= 2
            seen += [share.start + i for b in local for i in b]
        assert sorted(seen) == list(range(n))


def test_the_shard_sampler_resumes_at_the_right_sample():
    sampler = ShardShareSampler(30, 24, 4, seed=1, rank=1, window=10)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=4)
    assert list(sampler) == full[4:]
    assert len(full) == 6  # the smaller share's 24 // 4: every process runs the same steps


def _share_worker(rank: int, world: int, port: int, options: dict, result_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    from d2mae.runtime import distributed as du
    from d2mae.train.pretrain import Pretrainer
    from d2mae.train.pretrain_config import make_config

    ctx, device = du.init_distributed("cpu")
    try:
        run = Pretrainer(make_config(**options), ctx, device)
        assert run.setup()
        seen = []
        for epoch in range(run.cfg.epochs):
            run.sampler.set_epoch(epoch)
            seen.append([run.train_refs[i] for b in run.sampler for i, _ in b])
        cache = len(run.batches.cache) if run.data_path == "memory" else None
        run.train()
        Path(f"{result_dir}/rank{rank}.json").write_text(json.dumps({"seen": seen, "cache": cache,
                                                                     "share": len(run.train_refs)}))
    finally:
        du.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("data_path", ["memory", "loader"])
def test_two_processes_on_shards_each_read_their_own_share(corpus, tmp_path, data_path):
    _, shards = corpus
    results = tmp_path / "results"
    results.mkdir()
    options = dict(TINY, data=[str(shards)], out=str(tmp_path / "run"), epochs=2, batch_size=4, warmup_epochs=0,
                   num_workers=0, data_path=data_path, device="cpu", tensorboard="off", log_every_steps=1)
    mp.spawn(_share_worker, args=(2, _free_port(), options, str(results)), nprocs=2, join=True)
    info = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    everything = set(ShardSet.open(shards).refs)
    for epoch in range(2):
        a, b = info[0]["seen"][epoch], info[1]["seen"][epoch]
        assert len(a) == len(b) == 24 and not set(a) & set(b) and set(a) | set(b) == everything
    assert info[0]["share"] == info[1]["share"] == 24
    if data_path == "memory":
        assert info[0]["cache"] == info[1]["cache"] == 24  # each process caches only its share
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # 6 steps per epoch, logged once (rank 0)
    assert len((tmp_path / "run" / "pretrain_hashes.txt").read_text().splitlines()) == 48


def test_a_stopped_run_on_shards_resumes_to_the_same_weights(corpus, tmp_path, monkeypatch):
    from d2mae.train import pretrain as pt

    _, shards = corpus
    flags = ["pretrain", "--data", str(shards), "--arch", "vit_tiny_patch16", "--img-size", "32", "--depth", "2",
             "--embed-dim", "64", "--num-heads", "2", "--decoder-embed-dim", "32", "--decoder-depth", "1",
             "--decoder-num-heads", "2", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "0",
             "--tensorboard", "off", "--num-workers", "0", "--data-path", "loader"]
    assert cli.main(flags + ["--out", str(tmp_path / "whole")]) == 0
    real_step = pt.Pretrainer.train_step

    def step_then_term(self, *args, **kwargs):  # noqa: ANN001
        out = real_step(self, *args, **kwargs)
        if self.step == 5:  # inside the first epoch (12 steps each)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(pt.Pretrainer, "train_step", step_then_term)
    assert cli.main(flags + ["--out", str(tmp_path / "cut")]) == 143
    monkeypatch.setattr(pt.Pretrainer, "train_step", real_step)
    assert cli.main(flags + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    a, b = load_weights(tmp_path / "whole" / "model.safetensors"), load_weights(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cut" / INDEX).exists() is False
