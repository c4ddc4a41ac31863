"""Image sources: folders, files and lists of paths, as a sorted list of image references.

:func:`find_images` walks folders (recursive, following symbolic links but each real folder once, hidden names
skipped), takes single files and ``.csv``/``.txt`` lists of paths. A multi-frame (cine) DICOM becomes one reference
per frame, ``file.dcm#frame=N``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from d2mae.data.shards import ShardSet, is_shard_folder
from d2mae.runtime.errors import D2maeError, reason

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm",
                                     ".ppm", ".pbm", ".pnm")


DICOM_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom", ".dic")


LIST_EXTENSIONS: tuple[str, ...] = (".csv", ".txt")


FRAME_MARK = "#frame="


DICOM_HINT = "reading DICOM needs pydicom: pip install d2mae[dicom]"


def split_ref(ref: str | Path) -> tuple[str, int | None]:
    """``"a.dcm#frame=3"`` -> ``("a.dcm", 3)``; a plain path -> ``(path, None)``."""
    ref = str(ref)
    head, mark, tail = ref.rpartition(FRAME_MARK)
    if mark and tail.isdigit():
        return head, int(tail)
    return ref, None


def is_dicom_bytes(head: bytes) -> bool:
    """The DICOM Part 10 magic: a 128-byte preamble followed by ``DICM``."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return is_dicom_bytes(fh.read(132))
    except OSError:
        return False


def import_pydicom(path: str) -> Any:
    try:
        import pydicom
    except ImportError:
        raise D2maeError(f"{path} is a DICOM file; {DICOM_HINT}") from None
    return pydicom


def _dicom_frames(path: Path) -> int:
    """Number of frames of a DICOM file from its header (1 when unreadable: :func:`load_image` reports the problem)."""
    pydicom = import_pydicom(str(path))
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except Exception:  # noqa: BLE001 - a bad header is reported when the image is loaded
        return 1


def _accept(path: Path) -> bool:
    """Is a file found in a folder an image? By extension; files without one are sniffed for the DICOM magic."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS or suffix in DICOM_EXTENSIONS:
        return True
    return suffix == "" and is_dicom_file(path)


def _walk(folder: Path) -> Iterable[Path]:
    """Image files under ``folder``, following symlinks, each real folder once (no infinite symlink loops)."""
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            dirs[:] = []
            continue
        seen.add(key)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            if _accept(path):
                yield path


def _read_list(list_path: Path) -> list[tuple[str, str]]:
    """(entry, where) pairs from a ``.csv`` (column ``path``; or one path per row) or ``.txt`` (one per line)."""
    try:
        text = list_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise D2maeError(f"cannot read the list of images {list_path}: {reason(exc)}") from None
    entries: list[tuple[str, str]] = []
    if list_path.suffix.lower() == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        rows = [r for r in rows if any(c.strip() for c in r)]
        if not rows:
            raise D2maeError(f"the list of images {list_path} is empty")
        header = [c.strip().lower() for c in rows[0]]
        if "path" in header:
            col = header.index("path")
            for n, row in enumerate(rows[1:], start=2):
                if col >= len(row) or not row[col].strip():
                    raise D2maeError(f"{list_path} line {n}: the 'path' column is empty")
                entries.append((row[col].strip(), f"{list_path} line {n}"))
        elif all(len(r) == 1 for r in rows):
            entries = [(r[0].strip(), f"{list_path} line {n}") for n, r in enumerate(rows, start=1)]
        else:
            raise D2maeError(f"{list_path} has no 'path' column (columns: {', '.join(rows[0])}); "
                             "add a header with a 'path' column or list one path per line")
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((line, f"{list_path} line {n}"))
    return entries


def _expand(path: Path, where: str, allow_lists: bool) -> list[str]:
    """One source (folder, image, DICOM, list, or ``file#frame=N``) -> image references."""
    base, frame = split_ref(path)
    if frame is not None:
        if not Path(base).is_file():
            raise D2maeError(f"{where}: {base} does not exist")
        return [str(Path(base).absolute()) + f"{FRAME_MARK}{frame}"]
    if not path.exists():
        hint = " (a broken symbolic link)" if path.is_symlink() else ""
        raise D2maeError(f"{where}: {path} does not exist{hint}")
    if path.is_dir():
        return [str(p.absolute()) for p in _walk(path)]
    suffix = path.suffix.lower()
    if suffix in LIST_EXTENSIONS:
        if not allow_lists:
            raise D2maeError(f"{where}: {path} is a list of images inside a list; list image files or folders")
        out: list[str] = []
        for entry, line in _read_list(path):
            p = Path(entry)
            if not p.is_absolute() and not Path(split_ref(entry)[0]).is_absolute():
                p = path.parent / entry
            out.extend(_expand(p, line, allow_lists=False))
        return out
    if _accept(path) or is_dicom_file(path):
        return [str(path.absolute())]
    raise D2maeError(f"{where}: {path} is not an image (known extensions: {', '.join(IMAGE_EXTENSIONS)}, "
                     f"DICOM {', '.join(DICOM_EXTENSIONS)}, lists .csv/.txt)")


def find_images(paths: Sequence[str | Path] | str | Path) -> list[str]:
    """All image references under ``paths``: sorted, de-duplicated, multi-frame DICOMs expanded to frames.

    Args:
        paths: folders (searched recursively, following symbolic links but visiting each real folder once; names
            starting with ``.`` are skipped), image or DICOM files, ``file.dcm#frame=N`` references, and lists:
            a ``.csv`` with a ``path`` column or a ``.txt`` with one path per line, relative paths taken relative to
            the list's folder.

    Returns:
        Absolute paths as strings, sorted; a file reached twice (through a symbolic link or two sources) appears
        once. A DICOM with NumberOfFrames > 1 appears as ``path#frame=0`` … ``path#frame=F-1``. A shard folder
        (:mod:`d2mae.data.shards`) gives its images as ``shard.tar#member=…`` references, first, in the order written.

    Raises:
        D2maeError: a path that does not exist, a file that is not an image, or no image found at all.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise D2maeError("no image source given; pass a folder, image files or a .csv/.txt list of images")

    refs: list[str] = []
    shard_refs: list[str] = []  # shard folders' images keep the order they were written in (rank shares)
    for source in paths:
        if Path(source).is_dir() and is_shard_folder(source):
            shard_refs.extend(ShardSet.open(source).refs)
            continue
        found = _expand(Path(source), "image source", allow_lists=True)
        if not found:
            raise D2maeError(f"image source {source}: no images found (known extensions: "
                             f"{', '.join(IMAGE_EXTENSIONS + DICOM_EXTENSIONS)})")
        refs.extend(found)
    unique: dict[tuple[str, int | None], str] = {}
    for ref in sorted(refs):
        base, frame = split_ref(ref)
        unique.setdefault((os.path.realpath(base), frame), ref)
    out: list[str] = []
    for ref in sorted(unique.values()):
        base, frame = split_ref(ref)
        if frame is None and Path(base).suffix.lower() in DICOM_EXTENSIONS + ("",):
            frames = _dicom_frames(Path(base))
            if frames > 1:
                out.extend(f"{base}{FRAME_MARK}{i}" for i in range(frames))
                continue
        out.append(ref)
    return shard_refs + out
