"""``d2mae shards``: pack images into WebDataset-style tar shards for corpora larger than memory."""

from __future__ import annotations

import argparse

from d2mae.commands.flags import add_with_positional, config_from_cli
from d2mae.data.shard_writer import ShardsConfig, make_shards
from d2mae.data.shards import ShardSet


def add(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Pack images into tar shards (shard-00000.tar …, index.json) that every command reads with --data DIR: "
        "pre-training then streams them, each torchrun process its own share. Example: "
        "d2mae shards /data/us/ --out /data/us-shards --shard-size 1000")
    add_with_positional(parser, ShardsConfig, "sources", "image folders, files or .csv/.txt lists")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(ShardsConfig, args, positional="sources")
    index = make_shards(cfg)
    shards = ShardSet.open(index.parent)
    print(f"wrote {len(shards.refs)} images in {len(shards.shard_sizes)} shard(s) and {index}")
    return 0
