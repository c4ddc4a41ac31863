"""Image corpora larger than memory: WebDataset-style tar shards, written once, read as a stream.

``d2mae shards SRC... --out DIR`` (:func:`write_shards`) packs the images into ``DIR/shard-00000.tar`` … with
``shard_size`` images each, in a seeded random order (so that every shard is a sample of the whole corpus, not of one
folder or scanner), plus ``DIR/index.json``: per image its tar member, byte offset and size, source path, size in
pixels and content hash. An image's member holds the source file's bytes unchanged (PNG, JPEG, TIFF, single-frame
DICOM …), so its pixels, its sharpness (docs/views.md) and its content hash (the fine-tuning leak guard) are the
original's; a frame of a multi-frame DICOM is stored as a lossless 16-bit PNG of its decoded pixels.

Reading: ``--data DIR`` of any command finds the shard folder (:func:`d2mae.data.sources.find_images`) and gets one
reference per image, ``shard.tar#member=OFFSET:SIZE:NAME``, which :func:`d2mae.data.decode.load_image` reads with one
seek (no tar scan). Pre-training on shards (:mod:`d2mae.train.pretrain`) gives each of W processes its own
contiguous share of the corpus (:func:`rank_share`: whole shards, but for at most two it shares with a neighbour),
shuffles it per epoch in windows of a shard (:class:`ShardShareSampler`: reads stay sequential within a shard),
decodes and crops in loader workers or in a per-rank memory cache of only its share, and blurs on the device.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from d2mae.data.sampler import EpochBatchSampler
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.options import check_fields
from d2mae.runtime.seeds import STREAM_ORDER, derive_seed

INDEX = "index.json"
FORMAT = "d2mae-shards"
VERSION = 1
MEMBER_MARK = "#member="


def member_ref(shard: Path, offset: int, size: int, name: str) -> str:
    """The reference of one image inside a shard."""
    return f"{shard}{MEMBER_MARK}{offset}:{size}:{name}"


def split_member(ref: str) -> tuple[str, int, int, str] | None:
    """``shard.tar#member=OFFSET:SIZE:NAME`` -> (shard path, offset, size, member name); other refs -> ``None``."""
    head, mark, tail = str(ref).rpartition(MEMBER_MARK)
    if not mark:
        return None
    parts = tail.split(":", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return head, int(parts[0]), int(parts[1]), parts[2]


def read_member(ref: str) -> bytes:
    """The bytes of one shard member (one seek and one read)."""
    shard, offset, size, name = split_member(ref) or ("", 0, 0, "")
    try:
        with open(shard, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
    except OSError as exc:
        raise D2maeError(f"cannot read {name} from shard {shard}: {exc.strerror or exc}") from None
    if len(data) != size:
        raise D2maeError(f"shard {shard} is truncated: {name} needs {size} bytes at {offset}, found {len(data)}; "
                         "write the shards again (d2mae shards)")
    return data


def is_shard_folder(path: str | Path) -> bool:
    index = Path(path) / INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class ShardSet:
    """A shard folder as read from its ``index.json``: one reference, content hash and (h, w) per image, in the
    order written, and the images per shard."""

    folder: Path
    refs: list[str]
    hashes: list[str]
    shapes: list[tuple[int, int]]
    sources: list[str]
    shard_sizes: list[int]

    @classmethod
    def open(cls, folder: str | Path) -> "ShardSet":
        folder = Path(folder).absolute()
        path = folder / INDEX
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise D2maeError(f"{path} cannot be read ({exc}); write the shards again (d2mae shards)") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise D2maeError(f"{path} is not a d2mae shard index")
        if int(index.get("version", 0)) > VERSION:
            raise D2maeError(f"{path} was written by a newer d2mae (shard format {index.get('version')})")
        refs, hashes, shapes, sources, sizes = [], [], [], [], []
        for shard in index.get("shards", []):
            file = folder / shard["file"]
            if not file.is_file():
                raise D2maeError(f"shard {file} listed in {path} does not exist")
            for s in shard["samples"]:
                refs.append(member_ref(file, int(s["offset"]), int(s["size"]), s["name"]))
                hashes.append(str(s["sha256"]))
                shapes.append((int(s["height"]), int(s["width"])))
                sources.append(str(s.get("source", "")))
            sizes.append(len(shard["samples"]))
        if not refs:
            raise D2maeError(f"{path} lists no images")
        return cls(folder, refs, hashes, shapes, sources, sizes)


def open_shards(sources: Sequence[str | Path]) -> ShardSet | None:
    """The shard set when ``sources`` is exactly one shard folder, else ``None`` (images read as files)."""
    if len(sources) == 1 and is_shard_folder(sources[0]):
        return ShardSet.open(sources[0])
    return None


def rank_share(n: int, rank: int, world: int) -> slice:
    """Process ``rank``'s contiguous share of ``n`` images in shard order: W parts whose sizes differ by ≤ 1."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (rank < extra))


class ShardShareSampler(EpochBatchSampler):
    """Batches of ``(index, seed)`` from this process's share of a shard set (indices local to the share).

    Every process runs the same number of micro-steps, those of the smallest share (``min_samples``); each epoch
    shuffles the share in windows of ``window`` images (window order and the images inside each window, seeded by
    seed, rank and epoch), so that a loader reads one shard after another instead of seeking across all of them.
    ``set_epoch(epoch, start)`` resumes at a micro-step, as the parent class.
    """

    def __init__(self, num_samples: int, min_samples: int, batch_size: int, seed: int, rank: int,
                 steps_multiple: int = 1, window: int = 1000) -> None:
        super().__init__(min_samples, batch_size, derive_seed(seed, rank), steps_multiple=steps_multiple)
        self.num_samples = int(num_samples)  # the share; micro_steps were counted on the smallest share
        self.window = max(1, int(window))

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, STREAM_ORDER))
        starts = torch.arange(0, self.num_samples, self.window)
        out = []
        for s in starts[torch.randperm(len(starts), generator=g)].tolist():
            size = min(self.window, self.num_samples - s)
            out.append(s + torch.randperm(size, generator=g))
        return torch.cat(out)


def _member_bytes(ref: str) -> tuple[bytes, str, str]:
    """What to store for one image: the source file's bytes, its extension and their SHA-256 (the content hash of
    :func:`d2mae.data.decode.content_hash`); a DICOM frame as a 16-bit PNG, with the frame's own content hash."""
    from PIL import Image

    from d2mae.data.decode import content_hash, load_image
    from d2mae.data.sources import split_ref

    member = split_member(ref)
    if member is not None:  # an image of another shard set
        data = read_member(ref)
        return data, Path(member[3]).suffix, hashlib.sha256(data).hexdigest()
    path, frame = split_ref(ref)
    if frame is None:
        data = Path(path).read_bytes()
        return data, (Path(path).suffix.lower() or ".dcm"), hashlib.sha256(data).hexdigest()
    arr = load_image(ref, 1)[:, :, 0]  # [H, W] in [0, 1]
    buf = io.BytesIO()
    Image.fromarray(np.rint(arr * 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue(), ".png", content_hash(ref)


def write_shards(refs: Sequence[str], out: str | Path, shard_size: int = 1000, seed: int = 0,
                 progress: bool = False) -> Path:
    """Write ``refs`` (checked images) as tar shards of ``shard_size`` images, in an order shuffled by ``seed``,
    and ``index.json`` last (the folder is a shard set once it exists); returns the index's path."""
    from d2mae.data.decode import image_shape
    from d2mae.runtime.files import atomic_write_json, atomic_writer

    out = Path(out)
    order = torch.randperm(len(refs), generator=torch.Generator().manual_seed(seed)).tolist()
    shards: list[dict[str, Any]] = []
    bar: Any = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(refs), desc="writing shards", unit="img")
    for k, lo in enumerate(range(0, len(order), shard_size)):
        file = out / f"shard-{k:05d}.tar"
        samples = []
        with atomic_writer(file) as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for j in order[lo:lo + shard_size]:
                data, ext, digest = _member_bytes(refs[j])  # the source read once: bytes and hash
                info = tarfile.TarInfo(f"{j:09d}{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                offset = fh.tell() + tarfile.BLOCKSIZE  # USTAR, short name: one header block, then the data
                tar.addfile(info, io.BytesIO(data))
                h, w = image_shape(refs[j])
                samples.append({"name": info.name, "offset": offset, "size": len(data), "source": refs[j],
                                "sha256": digest, "height": h, "width": w})
                if bar is not None:
                    bar.update(1)
        shards.append({"file": file.name, "samples": samples})
    if bar is not None:
        bar.close()
    atomic_write_json(out / INDEX, {"format": FORMAT, "version": VERSION, "count": len(refs), "seed": seed,
                                    "shard_size": shard_size, "shards": shards})
    return out / INDEX


@dataclass
class ShardsConfig:
    """What ``d2mae shards`` takes (every field a flag and a YAML key; the sources are positional)."""

    sources: list[str] = field(default_factory=list, metadata={"help": "image folders, files or .csv/.txt lists"})
    out: str = field(default="", metadata={"help": "folder for the shards and index.json", "metavar": "DIR"})
    shard_size: int = field(default=1000, metadata={"help": "images per shard", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of the order images are shuffled into shards", "min": 0})
    skip_bad: bool = field(default=False, metadata={"help": "leave out unreadable images (listed in "
                                                              "OUT/bad_images.txt) instead of stopping"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_fields(self)


def make_shards(cfg: ShardsConfig) -> Path:
    """``d2mae shards``: find and check the images (every one decoded once), then :func:`write_shards` into a
    locked ``cfg.out``; a folder that already holds a shard set is refused. Returns the index's path."""
    from d2mae.data.decode import check_images
    from d2mae.data.sources import find_images
    from d2mae.runtime.locks import output_lock
    from d2mae.runtime.options import save_config

    if not cfg.sources:
        raise D2maeError("no images given: pass image folders, files or .csv/.txt lists", option="sources")
    if not cfg.out:
        raise D2maeError("is required: the folder for the shards", option="out")
    out = Path(cfg.out)
    if (out / INDEX).exists():
        raise D2maeError(f"{out} already holds a shard set ({out / INDEX}); choose another folder", option="out")
    with output_lock(out, "shards"):
        refs = check_images(find_images(cfg.sources), 1, skip_bad=cfg.skip_bad, out_dir=out)
        save_config(cfg, out / "shards_config.yaml")
        return write_shards(refs, out, cfg.shard_size, cfg.seed, cfg.progress)

