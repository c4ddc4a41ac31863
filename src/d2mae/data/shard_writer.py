"""``d2mae shards``: pack checked images into tar shards of the format of :mod:`d2mae.data.shards`, in a seeded order,
each source's bytes unchanged (a DICOM frame as a lossless 16-bit PNG), with ``index.json`` written last."""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from d2mae.data.decode import check_images, content_hash, image_shape, load_image
from d2mae.data.shards import FORMAT, INDEX, VERSION, read_member, split_member
from d2mae.data.sources import find_images, split_ref
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_json, atomic_writer
from d2mae.runtime.locks import output_lock
from d2mae.runtime.options import check_fields, save_config
from d2mae.runtime.outputs import claim_folder


def _member_bytes(ref: str) -> tuple[bytes, str, str]:
    """What to store for one image: the source file's bytes, its extension and their SHA-256 (the content hash of
    :func:`d2mae.data.decode.content_hash`); a DICOM frame as a 16-bit PNG, with the frame's own content hash."""

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

    out = Path(out)
    order = torch.randperm(len(refs), generator=torch.Generator().manual_seed(seed)).tolist()
    shards: list[dict[str, Any]] = []
    bar: Any = None
    if progress:
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
    progress: bool = field(default=True, metadata={"advanced": True, "help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_fields(self)


def make_shards(cfg: ShardsConfig) -> Path:
    """``d2mae shards``: find and check the images (every one decoded once), then :func:`write_shards` into a
    locked ``cfg.out``; a folder that already holds a shard set is refused. Returns the index's path."""

    if not cfg.sources:
        raise D2maeError("no images given: pass image folders, files or .csv/.txt lists", option="sources")
    if not cfg.out:
        raise D2maeError("is required: the folder for the shards", option="out")
    out = Path(cfg.out)
    if (out / INDEX).exists():
        raise D2maeError(f"{out} already holds a shard set ({out / INDEX}); choose another folder", option="out")
    claim_folder(out, "shards", list(cfg.sources), resumable=True, forceable=False)
    with output_lock(out, "shards"):
        refs = check_images(find_images(cfg.sources), 1, skip_bad=cfg.skip_bad, out_dir=out)
        save_config(cfg, out / "shards_config.yaml")
        return write_shards(refs, out, cfg.shard_size, cfg.seed, cfg.progress)
