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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from d2mae.runtime.errors import D2maeError, shown

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
        """Read and check ``folder/index.json``: every field's type and range, each shard file inside the folder,
        each member inside its shard, the counts. A problem is one :class:`D2maeError` naming the key."""
        folder = Path(folder).absolute()
        path = folder / INDEX
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise D2maeError(f"{path} cannot be read ({exc}); write the shards again (d2mae shards)") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise D2maeError(f"{path} is not a d2mae shard index")
        version = _field(index, "version", int, path, "")
        if version > VERSION:
            raise D2maeError(f"{path} was written by a newer d2mae (shard format {version})")
        shards = _field(index, "shards", list, path, "")
        refs, hashes, shapes, sources, sizes = [], [], [], [], []
        for k, shard in enumerate(shards):
            where = f"shards[{k}]"
            if not isinstance(shard, dict):
                raise D2maeError(f"{path}: '{where}' must be an object with 'file' and 'samples'")
            file = _member_file(folder, _field(shard, "file", str, path, where), path, where)
            length = file.stat().st_size
            for j, s in enumerate(_field(shard, "samples", list, path, where)):
                here = f"{where}.samples[{j}]"
                if not isinstance(s, dict):
                    raise D2maeError(f"{path}: '{here}' must be an object (name, offset, size, sha256, height, width)")
                name = _field(s, "name", str, path, here)
                offset, size = _field(s, "offset", int, path, here), _field(s, "size", int, path, here)
                if offset < 0 or size < 1 or offset + size > length:
                    raise D2maeError(f"{path}: '{here}' (offset {offset}, size {size}) does not lie inside {file.name} "
                                     f"({length} bytes); write the shards again (d2mae shards)")
                digest = _field(s, "sha256", str, path, here)
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise D2maeError(f"{path}: '{here}.sha256' must be 64 hexadecimal digits")
                height, width = _field(s, "height", int, path, here), _field(s, "width", int, path, here)
                if height < 1 or width < 1:
                    raise D2maeError(f"{path}: '{here}' height and width must be ≥ 1, got {height} × {width}")
                refs.append(member_ref(file, offset, size, name))
                hashes.append(digest)
                shapes.append((height, width))
                sources.append(str(s.get("source", "")))
            sizes.append(len(shard["samples"]))
        if not refs:
            raise D2maeError(f"{path} lists no images")
        if "count" in index and index["count"] != len(refs):
            raise D2maeError(f"{path}: 'count' is {index['count']!r} but the shards list {len(refs)} images")
        return cls(folder, refs, hashes, shapes, sources, sizes)

    def verify(self, hashes: Sequence[str]) -> None:
        """Compare the SHA-256 of the bytes read (``hashes``, one per image in order) with the index's. Members that
        hold a re-encoded DICOM frame are recorded by the frame's own pixel hash and are not compared."""
        for ref, source, want, got in zip(self.refs, self.sources, self.hashes, hashes):
            if "#frame=" not in source and want != got:
                shard, _, _, name = split_member(ref) or (ref, 0, 0, "")
                raise D2maeError(f"{self.folder / INDEX}: {name} in {Path(shard).name} does not match its sha256 in "
                                 "the index (the shard or the index was changed); write the shards again "
                                 "(d2mae shards)")


def _field(obj: dict, key: str, kind: type, path: Path, where: str) -> Any:
    """``obj[key]``, which must be of type ``kind`` (a bool is not an int), else an error naming the key."""
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise D2maeError(f"{path}: '{name}' is missing; write the shards again (d2mae shards)")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {int: "an integer", str: "a string", list: "a list"}[kind]
        raise D2maeError(f"{path}: '{name}' must be {expected}, got {shown(value)}")
    return value


def _member_file(folder: Path, file: str, path: Path, where: str) -> Path:
    """A shard file named by the index: a plain name inside the shard folder, that exists."""
    candidate = (folder / file).resolve()
    if Path(file).is_absolute() or candidate.parent != folder.resolve() or Path(file).name != file:
        raise D2maeError(f"{path}: '{where}.file' = {shown(file)} is not a file inside {folder}; a shard index may "
                         "only name its own shards")
    if not candidate.is_file():
        raise D2maeError(f"shard {candidate} listed in {path} does not exist")
    return folder / file


def open_shards(sources: Sequence[str | Path]) -> ShardSet | None:
    """The shard set when ``sources`` is exactly one shard folder, else ``None`` (images read as files)."""
    if len(sources) == 1 and is_shard_folder(sources[0]):
        return ShardSet.open(sources[0])
    return None


