"""Image sources, decoding and the geometric augmentations of pre-training and fine-tuning.

The loaders only decode and crop: every image leaves this module as float32 in [0, 1] (``[H, W, C]`` arrays from
:func:`load_image`, ``[C, S, S]`` tensors from :class:`ImageDataset`). Blurring at σ_t and normalisation with the data
set's mean/std happen inside the model, on its device (:mod:`d2mae.models`), so one loader serves MAE, DeblurrMAE and
D²MAE alike (Section 2.2).

Sources (:func:`find_images`): folders (recursive, symlink-loop safe, hidden files skipped), single files, and
``.csv``/``.txt`` lists of paths. A multi-frame (cine) DICOM becomes one reference per frame, ``file.dcm#frame=N``.

Decoding (:func:`load_image`), one rule per kind of pixel data:

* 8-bit images (L, P, RGB, RGBA, CMYK, …): value / 255. Alpha is dropped (pixels as stored, not composited);
  grayscale output uses PIL's ITU-R 601-2 luma of the RGB pixels; EXIF orientation is applied.
* 16-bit images (``I;16`` PNG/TIFF): value / 65535. 32-bit integer images (``I``): / 65535 when all values lie in
  [0, 65535], else min-max scaled per image.
* Float images (``F`` TIFF): taken as is when every finite value is already in [0, 1], else min-max scaled per image;
  NaN/inf pixels become 0. A constant image becomes all zeros.
* DICOM (needs ``pip install d2mae[dicom]``): stored values / (2^BitsStored - 1) for unsigned data, min-max per frame
  for signed or float data; MONOCHROME1 is inverted so that bright means echogenic; colour data (RGB, YBR) is
  converted to RGB by pydicom. A multi-frame DICOM without ``#frame=N`` gives its first frame.
* Multi-frame TIFF/GIF: the first frame.

Anything that cannot be read raises :class:`~d2mae.errors.D2maeError` naming the file; :func:`check_images` opens
every image once before training, so a bad file stops a run at its start, or (``skip_bad``) is listed in
``bad_images.txt`` and left out. docs/bad-inputs.md lists every bad input tried and what happens.

Views. Every path resamples with PIL's antialiased bicubic filter from the original resolution: the loaders with
PIL itself (:func:`resize_box`, the reference view), and the pre-training memory cache (:class:`DecodedCache`,
images decoded once and kept at native resolution) with the same filter on the device (:mod:`d2mae.resample`), so
that no data path softens the image D²MAE reconstructs (σ ≤ 0.1 px against the reference, :mod:`d2mae.sharpness`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from d2mae.errors import D2maeError
from d2mae.runtime import atomic_write_text, file_sha256

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm",
                                     ".ppm", ".pbm", ".pnm")
DICOM_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom", ".dic")
LIST_EXTENSIONS: tuple[str, ...] = (".csv", ".txt")
FRAME_MARK = "#frame="
AUGMENTS = ("none", "mae", "finetune")
CROP_SCALE = (0.2, 1.0)  # MAE pre-training's RandomResizedCrop area range
CROP_RATIO = (3 / 4, 4 / 3)  # and its aspect range (width / height, original pixels)
#: The cache keeps at least this many stored pixels per output pixel for the smallest crop an image can give, so
#: that its crops are as sharp as PIL's crop of the original file (equivalent σ ≤ 0.1 px; tests/test_data.py).
CACHE_MARGIN = 2.0

DICOM_HINT = "reading DICOM needs pydicom: pip install d2mae[dicom]"


# ---------------------------------------------------------------------------------------------------------------
# references and sources
# ---------------------------------------------------------------------------------------------------------------

def split_ref(ref: str | Path) -> tuple[str, int | None]:
    """``"a.dcm#frame=3"`` -> ``("a.dcm", 3)``; a plain path -> ``(path, None)``."""
    ref = str(ref)
    head, mark, tail = ref.rpartition(FRAME_MARK)
    if mark and tail.isdigit():
        return head, int(tail)
    return ref, None


def _is_dicom_bytes(head: bytes) -> bool:
    """The DICOM Part 10 magic: a 128-byte preamble followed by ``DICM``."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def _sniff_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return _is_dicom_bytes(fh.read(132))
    except OSError:
        return False


def _import_pydicom(path: str) -> Any:
    try:
        import pydicom
    except ImportError:
        raise D2maeError(f"{path} is a DICOM file; {DICOM_HINT}") from None
    return pydicom


def _dicom_frames(path: Path) -> int:
    """Number of frames of a DICOM file from its header (1 when unreadable: :func:`load_image` reports the problem)."""
    pydicom = _import_pydicom(str(path))
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
    return suffix == "" and _sniff_dicom(path)


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
        raise D2maeError(f"cannot read the list of images {list_path}: {_reason(exc)}") from None
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
    if _accept(path) or _sniff_dicom(path):
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
        once. A DICOM with NumberOfFrames > 1 appears as ``path#frame=0`` … ``path#frame=F-1``.

    Raises:
        D2maeError: a path that does not exist, a file that is not an image, or no image found at all.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise D2maeError("no image source given; pass a folder, image files or a .csv/.txt list of images")
    refs: list[str] = []
    for source in paths:
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
    return out


# ---------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------

def _reason(exc: BaseException) -> str:
    """One short line describing an exception."""
    text = " ".join(str(exc).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _minmax(a: np.ndarray) -> np.ndarray:
    """Per-image min-max scaling to [0, 1]; non-finite pixels -> 0; a constant image -> zeros."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        raise ValueError("no finite pixel values")
    lo, hi = float(a[finite].min()), float(a[finite].max())
    out = np.where(finite, (a - lo) / (hi - lo) if hi > lo else 0.0, 0.0)
    return out


def _channels(a: np.ndarray, in_chans: int) -> np.ndarray:
    """[H, W] or [H, W, 1|3|4] in [0, 1] -> float32 [H, W, in_chans]; colour -> gray by ITU-R 601-2 luma."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"unsupported pixel layout {a.shape}")
    if a.shape[2] == 4:
        a = a[:, :, :3]
    if in_chans == 1 and a.shape[2] == 3:
        a = a @ np.array([0.299, 0.587, 0.114])[:, None]
    elif in_chans == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError("the image has no pixels")
    return np.ascontiguousarray(np.clip(a, 0.0, 1.0), dtype=np.float32)


def _pil_to_float(im: Image.Image, in_chans: int) -> np.ndarray:
    """A loaded PIL image -> float32 [H, W, in_chans] in [0, 1], following the module docstring's rules."""
    mode = im.mode
    if mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64) / 65535.0
    elif mode == "I":
        a = np.asarray(im).astype(np.float64)
        a = a / 65535.0 if a.size and a.min() >= 0 and a.max() <= 65535 else _minmax(a)
    elif mode == "F":
        a = np.asarray(im).astype(np.float64)
        finite = np.isfinite(a)
        if finite.all() and a.size and a.min() >= 0.0 and a.max() <= 1.0:
            pass
        else:
            a = _minmax(a)
    elif in_chans == 1 and mode in ("L", "1", "P", "LA", "La", "PA"):
        a = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    else:
        a = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
        if in_chans == 1:
            a = np.asarray(im.convert("RGB").convert("L"), dtype=np.float64) / 255.0
    return _channels(a, in_chans)


def _decode_pil(data: bytes, in_chans: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decode now so that truncated data fails here
        im = ImageOps.exif_transpose(im)
        return _pil_to_float(im, in_chans)


def _dicom_to_float(arr: np.ndarray, ds: Any, in_chans: int) -> np.ndarray:
    """One decoded DICOM frame [H, W] or [H, W, 3] -> float32 [H, W, in_chans] in [0, 1]."""
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or arr.dtype.itemsize * 8)
        a = arr.astype(np.float64) / float(2 ** bits - 1)
    else:
        a = _minmax(arr)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        a = 1.0 - a
    return _channels(a, in_chans)


def _decode_dicom(path: str, source: str | bytes, frame: int | None, in_chans: int) -> tuple[np.ndarray, bytes]:
    """A DICOM frame -> (float32 [H, W, in_chans], stored pixel bytes of that frame)."""
    pydicom = _import_pydicom(path)
    fileobj = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        ds = pydicom.dcmread(fileobj, force=True)
    except Exception as exc:  # noqa: BLE001
        raise D2maeError(f"cannot read DICOM {path}: {_reason(exc)}") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise D2maeError(f"DICOM {path} has no pixel data (no PixelData element); it holds no image")
    frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    index = frame if frame is not None else 0
    if index >= frames:
        raise D2maeError(f"DICOM {path} has {frames} frame(s); frame {index} does not exist")
    try:
        try:
            from pydicom.pixels import pixel_array
            arr = pixel_array(ds, index=index) if frames > 1 else ds.pixel_array
        except ImportError:  # pydicom 2.x
            arr = ds.pixel_array[index] if frames > 1 else ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - compressed data without a decoder, corrupt data, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or str(syntax or "unknown transfer syntax")
        raise D2maeError(f"cannot decode the pixel data of DICOM {path} ({name}): {_reason(exc)}; convert it to "
                         "uncompressed DICOM or PNG, or install a decoder "
                         "(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)") \
            from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):  # a stray frame axis
        arr = arr[0]
    raw = np.ascontiguousarray(arr).tobytes()
    try:
        return _dicom_to_float(arr, ds, in_chans), raw
    except ValueError as exc:
        raise D2maeError(f"DICOM {path}: {exc}") from None


def _decode(ref: str, in_chans: int) -> tuple[np.ndarray, str]:
    """Decode one reference -> (float32 [H, W, in_chans] in [0, 1], content hash). Errors name the file."""
    if in_chans not in (1, 3):
        raise D2maeError(f"in_chans must be 1 or 3, got {in_chans}")
    path, frame = split_ref(ref)
    p = Path(path)
    if not p.exists():
        hint = " (a broken symbolic link)" if p.is_symlink() else ""
        raise D2maeError(f"image {path} does not exist{hint}")
    if p.is_dir():
        raise D2maeError(f"image {path} is a folder, not an image file")
    if frame is not None:  # read only the header and the one frame, not a whole cine loop into memory
        arr, raw = _decode_dicom(path, path, frame, in_chans)
        return arr, hashlib.sha256(raw).hexdigest()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise D2maeError(f"cannot read image {path}: {_reason(exc)}") from None
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        raise D2maeError(f"image {path} is empty (0 bytes)")
    if _is_dicom_bytes(data[:132]) or p.suffix.lower() in DICOM_EXTENSIONS:
        return _decode_dicom(path, data, None, in_chans)[0], digest
    try:
        return _decode_pil(data, in_chans), digest
    except Image.DecompressionBombError as exc:
        raise D2maeError(f"image {path} is too large to decode safely ({_reason(exc)}); "
                         "downscale it or remove it") from None
    except D2maeError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt data; all mean "cannot read"
        raise D2maeError(f"cannot read image {path}: {_reason(exc)}") from None


def load_image(ref: str | Path, in_chans: int = 1) -> np.ndarray:
    """Decode one image reference (a path or ``file.dcm#frame=N``) to float32 ``[H, W, in_chans]`` in [0, 1].

    See the module docstring for how each pixel format is scaled. Raises :class:`D2maeError` naming the file for
    anything that cannot be read: missing, empty, truncated, corrupt, not an image, a decompression bomb (PIL's
    ``Image.MAX_IMAGE_PIXELS`` limit is kept), DICOM without pixel data or with undecodable compressed data.
    """
    return _decode(str(ref), in_chans)[0]


def content_hash(ref: str | Path) -> str:
    """sha256 hex of the file's bytes; for a ``#frame=N`` reference, of that frame's decoded (stored) pixel bytes."""
    path, frame = split_ref(str(ref))
    if frame is not None:
        return _decode(str(ref), 1)[1]
    try:
        return file_sha256(path)
    except OSError as exc:
        raise D2maeError(f"cannot read image {path}: {_reason(exc)}") from None


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _map_threads(fn: Callable[[str], Any], refs: Sequence[str]) -> Iterable[Any]:
    """``map(fn, refs)`` in order on a small thread pool (PIL and zlib release the GIL while decoding)."""
    if len(refs) < 4:
        yield from map(fn, refs)
        return
    with ThreadPoolExecutor(_threads()) as pool:
        try:
            yield from pool.map(fn, refs)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def content_hashes(refs: Sequence[str]) -> list[str]:
    """:func:`content_hash` of every image, in order, on a small thread pool."""
    return list(_map_threads(content_hash, list(refs)))


def check_images(refs: Sequence[str], in_chans: int = 1, skip_bad: bool = False, out_dir: str | Path | None = None,
                 min_size: int = 16) -> list[str]:
    """Open every image once before training, so a bad file stops the run at its start.

    Args:
        refs: image references (from :func:`find_images`).
        in_chans: channels the model takes.
        skip_bad: ``False``: the first bad image raises :class:`D2maeError` naming it. ``True``: bad images are left
            out with a warning giving their count; their list (``ref<TAB>reason``) is written to
            ``out_dir/bad_images.txt`` when ``out_dir`` is given.
        out_dir: where to write ``bad_images.txt`` (and ``duplicate_images.txt`` when duplicates are found).
        min_size: images whose shorter side is below this are bad (smaller images of at least ``min_size`` pixels
            are allowed and upsampled by the loaders).

    Returns:
        The good references, in the given order. Exact content duplicates (same file bytes, or same frame pixels)
        are kept but reported in one warning with their count.
    """
    refs = list(refs)
    if not refs:
        raise D2maeError("no images to check: the list of images is empty")

    def probe(ref: str) -> tuple[str | None, str | None]:
        try:
            arr, digest = _decode(ref, in_chans)
        except D2maeError as exc:
            return None, str(exc)
        h, w = arr.shape[:2]
        if min(h, w) < min_size:
            return None, (f"image {split_ref(ref)[0]} is {w}x{h} pixels, smaller than the minimum {min_size} px; "
                          "remove it or lower min_size")
        return digest, None

    good: list[str] = []
    bad: list[tuple[str, str]] = []
    first_of: dict[str, str] = {}
    duplicates: list[tuple[str, str]] = []
    for ref, (digest, error) in zip(refs, _map_threads(probe, refs)):
        if error is not None:
            if not skip_bad:
                raise D2maeError(f"{error} (or skip bad images with skip_bad / --skip-bad)")
            bad.append((ref, error))
            continue
        good.append(ref)
        if digest in first_of:
            duplicates.append((ref, first_of[digest]))
        else:
            first_of[digest] = ref
    if bad:
        where = ""
        if out_dir is not None:
            target = Path(out_dir) / "bad_images.txt"
            atomic_write_text(target, "".join(f"{r}\t{e}\n" for r, e in bad))
            where = f"; the list is in {target}"
        if not good:
            raise D2maeError(f"none of the {len(refs)} images could be read (first: {bad[0][1]}){where}")
        warnings.warn(f"skipped {len(bad)} of {len(refs)} images that could not be read (first: {bad[0][1]}){where}",
                      stacklevel=2)
    if duplicates:
        where = ""
        if out_dir is not None:
            target = Path(out_dir) / "duplicate_images.txt"
            atomic_write_text(target, "".join(f"{r}\t{o}\n" for r, o in duplicates))
            where = f"; the list is in {target}"
        warnings.warn(f"{len(duplicates)} of {len(good)} images duplicate another image's content (e.g. "
                      f"{duplicates[0][0]} == {duplicates[0][1]}); duplicates can leak between train and test "
                      f"splits{where}", stacklevel=2)
    return good


def compute_stats(refs: Sequence[str], in_chans: int = 1, max_images: int = 512,
                  seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel pixel mean and std in [0, 1] units, pooled over all pixels of up to ``max_images`` images.

    The images are a seeded random sample (the same ``seed`` gives the same numbers); each is taken at its full
    resolution, as :func:`load_image` decodes it. The std is floored at 1e-3 so that a constant data set still
    gives a usable normalisation. These fill ``ModelConfig.mean``/``std`` (the data set's own statistics, not
    ImageNet's).
    """
    refs = list(refs)
    if not refs:
        raise D2maeError("cannot compute image statistics: the list of images is empty")
    if len(refs) > max_images:
        pick = np.sort(np.random.default_rng(seed).choice(len(refs), size=max_images, replace=False))
        refs = [refs[i] for i in pick]
    total = np.zeros(in_chans, dtype=np.float64)
    total_sq = np.zeros(in_chans, dtype=np.float64)
    count = 0
    for arr in _map_threads(lambda r: load_image(r, in_chans), refs):
        flat = arr.reshape(-1, in_chans).astype(np.float64)  # [H*W, C]
        total += flat.sum(0)
        total_sq += (flat * flat).sum(0)
        count += flat.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(max(s, 1e-3)), 6) for s in std]


# ---------------------------------------------------------------------------------------------------------------
# datasets and augmentation
# ---------------------------------------------------------------------------------------------------------------

FINETUNE_DEFAULTS: dict[str, Any] = {
    "scale": (0.08, 1.0),       # RandomResizedCrop area range (MAE fine-tuning)
    "ratio": (3 / 4, 4 / 3),    # RandomResizedCrop aspect range
    "hflip": 0.5,               # horizontal flip probability
    "auto_augment": "rand-m9-mstd0.5-inc1",  # timm RandAugment policy; "none" turns it off
    "reprob": 0.25,             # random erasing probability
    "fill": 0,                  # fill of RandAugment's rotate/shear/translate: black, the ultrasound background
}


def _to_pil(arr: np.ndarray) -> Image.Image:
    """float32 [H, W, C] in [0, 1] -> 8-bit PIL image (L or RGB)."""
    u8 = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(u8[:, :, 0] if u8.shape[2] == 1 else u8)  # mode L or RGB


def random_erase_(x: torch.Tensor, p: float = 0.25, scale: tuple[float, float] = (0.02, 1 / 3),
                  ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Random erasing (MAE fine-tuning, ``reprob`` 0.25, per-pixel mode) on a [C, H, W] image in [0, 1].

    The erased box is filled with uniform noise in [0, 1] (timm fills with N(0, 1) in normalised units; in [0, 1]
    units uniform noise keeps the image in range). Uses the global torch RNG (seeded per DataLoader worker).
    """
    if p <= 0 or torch.rand(()) >= p:
        return x
    _, h, w = x.shape
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if eh < h and ew < w:
            top = int(torch.randint(0, h - eh + 1, ()))
            left = int(torch.randint(0, w - ew + 1, ()))
            x[:, top:top + eh, left:left + ew] = torch.rand(x.shape[0], eh, ew, dtype=x.dtype)
            break
    return x


class ImageDataset(Dataset):
    """Images as float32 tensors [C, S, S] in [0, 1], with the augmentation of one stage of the paper's pipeline.

    Args:
        refs: image references (:func:`find_images`, ideally checked with :func:`check_images`).
        img_size: output side S.
        in_chans: 1 (grayscale) or 3.
        augment: ``"none"``: resize the shorter side to S (bicubic, antialiased) and centre-crop S — the
            deterministic view of OBS, evaluation and prediction. ``"mae"``: RandomResizedCrop(S, scale=(0.2, 1),
            ratio=(3/4, 4/3), bicubic) + horizontal flip (MAE pre-training). Both resample the float image with
            PIL (:func:`resize_box`), keeping 16-bit precision. ``"finetune"``: RandomResizedCrop(S,
            scale=(0.08, 1)) + flip + timm RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing 0.25 (MAE
            fine-tuning), still in [0, 1] and not normalised; this path works on the 8-bit image, as RandAugment
            needs, and fills rotations/shears with black (the ultrasound background).
        labels: one int per image, or ``None`` (items then carry label -1).
        finetune_kwargs: overrides of :data:`FINETUNE_DEFAULTS` for ``"finetune"``.

    ``__getitem__(i)`` returns ``(image [C, S, S], label, i)``. The data set holds only paths and small picklable
    transforms, so it works with DataLoader workers; randomness comes from the torch/python RNGs that the
    DataLoader seeds per worker.
    """

    def __init__(self, refs: Sequence[str], img_size: int, in_chans: int = 1, augment: str = "none",
                 labels: Sequence[int] | None = None, finetune_kwargs: dict[str, Any] | None = None) -> None:
        if augment not in AUGMENTS:
            raise D2maeError(f"unknown augmentation '{augment}'; use one of {', '.join(AUGMENTS)}")
        if img_size < 1:
            raise D2maeError(f"image size must be a positive number of pixels, got {img_size}")
        if in_chans not in (1, 3):
            raise D2maeError(f"in_chans must be 1 or 3, got {in_chans}")
        self.refs = [str(r) for r in refs]
        if labels is not None and len(labels) != len(self.refs):
            raise D2maeError(f"{len(labels)} labels for {len(self.refs)} images; give one label per image")
        self.labels = [int(v) for v in labels] if labels is not None else None
        self.img_size = int(img_size)
        self.in_chans = in_chans
        self.augment = augment
        unknown = sorted(set(finetune_kwargs or {}) - set(FINETUNE_DEFAULTS))
        if unknown:
            raise D2maeError(f"unknown fine-tuning augmentation option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(FINETUNE_DEFAULTS)}")
        self.finetune_kwargs = {**FINETUNE_DEFAULTS, **(finetune_kwargs or {})}
        s = self.img_size
        if augment == "finetune":
            kw = self.finetune_kwargs
            self.geometry = v2.Compose([
                v2.RandomResizedCrop(s, scale=tuple(kw["scale"]), ratio=tuple(kw["ratio"]),
                                     interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(p=float(kw["hflip"]))])
            self.rand_augment = None
            policy = kw["auto_augment"]
            if policy and str(policy).lower() != "none":
                from timm.data.auto_augment import rand_augment_transform
                fill = int(kw["fill"])
                hparams = {"translate_const": int(s * 0.45), "img_mean": fill if in_chans == 1 else (fill,) * 3}
                if "mmax" not in str(policy):  # timm clips m to [0, 10]; at m = 10 its increasing posterize keeps
                    hparams["magnitude_max"] = 9.999  # 0 bits, which Pillow >= 10 refuses (ValueError)
                try:
                    self.rand_augment = rand_augment_transform(str(policy), hparams)
                except Exception as exc:  # noqa: BLE001
                    raise D2maeError(f"unknown RandAugment policy '{policy}' ({_reason(exc)}); "
                                     "use e.g. rand-m9-mstd0.5-inc1 or none") from None

    def __len__(self) -> int:
        return len(self.refs)

    def view(self, arr: np.ndarray) -> torch.Tensor:
        """Apply this data set's transform to a decoded image float32 [H, W, C] -> [C, S, S] in [0, 1]."""
        s = self.img_size
        if self.augment == "none":
            return torch.from_numpy(resize_box(arr, center_box(arr.shape[0], arr.shape[1]), s))
        if self.augment == "mae":
            from torchvision.transforms import RandomResizedCrop
            i, j, h, w = RandomResizedCrop.get_params(_shape_proxy(arr), scale=list(CROP_SCALE),
                                                      ratio=list(CROP_RATIO))
            flip = bool(torch.rand(()) < 0.5)
            return torch.from_numpy(resize_box(arr, (j, i, j + w, i + h), s, flip=flip))
        img = self.geometry(_to_pil(arr))
        if self.rand_augment is not None:
            img = self.rand_augment(img)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # [C, S, S]
        return random_erase_(x.contiguous(), p=float(self.finetune_kwargs["reprob"]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x = self.view(load_image(self.refs[i], self.in_chans))  # [C, S, S]
        label = self.labels[i] if self.labels is not None else -1
        return x, label, i


class SeededDataset(Dataset):
    """Wraps a data set (:class:`ImageDataset`): item ``(index, seed)`` -> ``base[index]``.

    Before each item the global Python/NumPy/torch(CPU) generators of the process (main or loader worker) are seeded
    with the item's own seed (from :class:`d2mae.distributed.EpochBatchSampler`), so its random crop, flip and
    RandAugment depend on ``(run seed, epoch, index)`` only: not on the rank, the loader worker, or a resume.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        return self.base[index]


def _shape_proxy(arr: np.ndarray) -> torch.Tensor:
    """A zero-strided [C, H, W] tensor with ``arr``'s shape, for torchvision's parameter samplers (no copy)."""
    h, w, c = arr.shape
    return torch.empty(()).expand(c, h, w)


def center_box(h: int, w: int) -> tuple[int, int, int, int]:
    """The largest centred square (left, top, right, bottom): resizing it to S equals "shorter side to S, crop S"."""
    side = min(h, w)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def resize_box(arr: np.ndarray, box: tuple[float, float, float, float], size: int | tuple[int, int],
               flip: bool = False) -> np.ndarray:
    """Crop ``box`` (left, top, right, bottom) of float32 [H, W, C] and resize it to [C, h, w], in [0, 1].

    ``size`` is S (a square S × S) or (w, h). PIL's bicubic resampling on 32-bit float images ('F' mode):
    antialiased when shrinking (as torchvision's ``antialias=True``), no precision lost for 16-bit or float sources,
    and single-threaded C, so that it stays fast in DataLoader workers and on busy machines alike. This is the
    reference view every other data path is measured against (:mod:`d2mae.sharpness`); the memory cache's crops
    reproduce it on the device (:mod:`d2mae.resample`).
    """
    w, h = (size, size) if isinstance(size, int) else size
    out = np.empty((arr.shape[2], h, w), dtype=np.float32)
    for c in range(arr.shape[2]):
        img = Image.fromarray(np.ascontiguousarray(arr[:, :, c], dtype=np.float32))  # mode F
        out[c] = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC, box=tuple(map(float, box))))
    if flip:
        out = np.ascontiguousarray(out[:, :, ::-1])
    return np.clip(out, 0.0, 1.0, out=out)


# ---------------------------------------------------------------------------------------------------------------
# decode cache and batched crops (pre-training without a DataLoader)
# ---------------------------------------------------------------------------------------------------------------



def crop_boxes(aspect: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
               generator: torch.Generator | None, attempts: int = 10) -> tuple[torch.Tensor, ...]:
    """Sample RandomResizedCrop boxes in fractions of each image's width/height (torchvision's algorithm, batched).

    Args:
        aspect: each original image's width / height [B] (the crop's area and aspect are measured in original pixels).

    Returns:
        (cx, cy, w, h) [B] each, fractions of the image in [0, 1].
    """
    b = aspect.shape[0]
    area = torch.empty(b, attempts).uniform_(scale[0], scale[1], generator=generator)  # [B, K] fraction of the area
    log_r = torch.empty(b, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)  # crop width / crop height, in pixels
    a = aspect[:, None]
    w = torch.sqrt(area * r / a)  # [B, K] fraction of the width
    h = torch.sqrt(area * a / r)
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))  # [B]
    # torchvision's fallback: the whole image cut to the nearest allowed aspect ratio
    fr = torch.clamp(aspect, ratio[0], ratio[1])
    fw = torch.where(aspect > fr, fr / aspect, torch.ones_like(aspect))
    fh = torch.where(aspect < fr, aspect / fr, torch.ones_like(aspect))
    idx = first.clamp_min(0)[:, None]
    w = torch.where(first >= 0, w.gather(1, idx)[:, 0], fw)
    h = torch.where(first >= 0, h.gather(1, idx)[:, 0], fh)
    u = torch.rand(b, 2, generator=generator)
    cx = torch.where(first >= 0, w / 2 + u[:, 0] * (1 - w), torch.full_like(w, 0.5))
    cy = torch.where(first >= 0, h / 2 + u[:, 1] * (1 - h), torch.full_like(h, 0.5))
    return cx, cy, w, h


def center_fractions(aspect: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The deterministic view's box (the largest centred square, :func:`center_box`) as (cx, cy, w, h) fractions."""
    aspect = aspect.float()
    w = torch.where(aspect > 1, 1 / aspect, torch.ones_like(aspect))
    h = torch.where(aspect < 1, aspect, torch.ones_like(aspect))
    half = torch.full_like(aspect, 0.5)
    return half, half, w, h


def stored_shape(h: int, w: int, img_size: int, scale: float = CROP_SCALE[0], ratio: tuple[float, float] = CROP_RATIO,
                 margin: float = CACHE_MARGIN) -> tuple[int, int]:
    """(height, width) at which :class:`DecodedCache` keeps an ``h`` × ``w`` image: native, or smaller when even its
    smallest crop (area ``scale``, the most extreme aspect of ``ratio``) would be ``margin`` × ``img_size`` pixels
    wide at a lower resolution."""
    smallest = math.sqrt(scale * h * w * min(ratio[0], 1 / ratio[1]))  # the shortest side any crop can have
    f = min(1.0, margin * img_size / max(smallest, 1e-9))
    return max(1, round(f * h)), max(1, round(f * w))


def image_shape(ref: str) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding the pixels (DICOM: Rows/Columns)."""
    path, frame = split_ref(ref)
    if frame is not None or Path(path).suffix.lower() in DICOM_EXTENSIONS or _sniff_dicom(Path(path)):
        ds = _import_pydicom(path).dcmread(path, stop_before_pixels=True, force=True)
        return int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if (im.getexif() or {}).get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation that swaps the axes
                w, h = h, w
            return h, w
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt data
        raise D2maeError(f"cannot read image {path}: {_reason(exc)}") from None


def cache_bytes(refs: Sequence[str], img_size: int, in_chans: int = 1, sample: int = 256, seed: int = 0) -> int:
    """The memory a :class:`DecodedCache` of ``refs`` would take, from the headers of up to ``sample`` images."""
    refs = list(refs)
    if not refs:
        return 0
    pick = refs if len(refs) <= sample else [refs[i] for i in np.random.default_rng(seed).choice(len(refs), sample,
                                                                                                 replace=False)]
    sizes = [math.prod(stored_shape(*image_shape(r), img_size)) for r in pick]
    return int(round(np.mean(sizes) * len(refs) * in_chans))


class DecodedCache:
    """Every image decoded once and kept, at native resolution, in one flat uint8 buffer on the device.

    Pre-training without a DataLoader: :meth:`batch` draws MAE's RandomResizedCrop + flip for a whole batch and
    resamples it with :func:`d2mae.resample.crop_resize` — the same antialiased bicubic filter as PIL's crop of the
    original file, so the target that Eq. 3 reconstructs is as sharp as the loader path's. An image is stored
    smaller than native only where even its smallest crop cannot use the resolution (:func:`stored_shape`, at
    least ``CACHE_MARGIN`` stored pixels per output pixel); crop boxes are drawn in original pixels.

    Memory: the stored pixels, one byte each (BUS-BRA, 1,875 images: 240 MB at 224 px, ~190 MB at 96 px).

    Attributes:
        data: uint8 [Σ C·h·w], image i at ``offsets[i]`` as [C, h_i, w_i] (move with :meth:`to`).
        shapes: stored (h, w) per image [N, 2]; ``original``: original (h, w) [N, 2].
        labels: int64 [N] (-1 when none were given).
    """

    def __init__(self, refs: Sequence[str], img_size: int, in_chans: int = 1,
                 labels: Sequence[int] | None = None, progress: bool = False) -> None:
        refs = [str(r) for r in refs]
        if not refs:
            raise D2maeError("cannot build the decoded-image cache: the list of images is empty")
        self.refs = refs
        self.img_size = int(img_size)
        self.in_chans = in_chans
        self.labels = torch.tensor(list(labels) if labels is not None else [-1] * len(refs), dtype=torch.long)
        if self.labels.shape[0] != len(refs):
            raise D2maeError(f"{self.labels.shape[0]} labels for {len(refs)} images; give one label per image")

        def decode(ref: str) -> tuple[np.ndarray, tuple[int, int]]:
            arr = load_image(ref, in_chans)  # [H, W, C]
            h, w = arr.shape[:2]
            hs, ws = stored_shape(h, w, self.img_size)
            x = (np.ascontiguousarray(arr.transpose(2, 0, 1)) if (hs, ws) == (h, w)
                 else resize_box(arr, (0, 0, w, h), (ws, hs)))  # [C, hs, ws], antialiased when shrunk
            return np.rint(x * 255.0).astype(np.uint8), (h, w)

        items = _map_threads(decode, refs)
        if progress:
            from tqdm import tqdm
            items = tqdm(items, total=len(refs), desc="decoding images", unit="img")
        chunks, shapes, original = [], [], []
        for x, hw in items:
            chunks.append(torch.from_numpy(x.reshape(-1)))
            shapes.append(x.shape[1:])
            original.append(hw)
        self.shapes = torch.tensor(shapes, dtype=torch.long)  # [N, 2]
        self.original = torch.tensor(original, dtype=torch.long)  # [N, 2]
        sizes = torch.tensor([c.numel() for c in chunks], dtype=torch.long)
        self.offsets = torch.cumsum(sizes, 0) - sizes  # [N]
        self.data = torch.cat(chunks)

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def aspect(self) -> torch.Tensor:
        """Original width / height per image [N]."""
        return self.original[:, 1].float() / self.original[:, 0].float()

    def to(self, device: torch.device | str) -> "DecodedCache":
        """Move the images (and labels) to ``device``, e.g. the GPU, so that batches never leave it."""
        self.data = self.data.to(device)
        self.labels = self.labels.to(device)
        return self

    def gather(self, idx: torch.Tensor, windows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx`` [B] as one zero-padded uint8 batch [B, C, H_max, W_max] on the cache's device, and their
        (h, w) [B, 2]; with ``windows`` (top, bottom, left, right) [B, 4] only those stored pixels of each image."""
        idx = idx.cpu()
        shapes = self.shapes[idx]  # [B, 2]
        if windows is None:
            windows = torch.stack([torch.zeros_like(shapes[:, 0]), shapes[:, 0], torch.zeros_like(shapes[:, 1]),
                                   shapes[:, 1]], 1)
        sizes = torch.stack([windows[:, 1] - windows[:, 0], windows[:, 3] - windows[:, 2]], 1)  # [B, 2]
        hb, wb = (int(v) for v in sizes.max(0).values)
        out = torch.zeros(len(idx), self.in_chans, hb, wb, dtype=torch.uint8, device=self.data.device)
        for k, (i, (top, bottom, left, right)) in enumerate(zip(idx.tolist(), windows.tolist())):
            h, w = (int(v) for v in self.shapes[i])  # copies only: the resampling is one batched operation
            o = int(self.offsets[i])
            image = self.data[o:o + self.in_chans * h * w].view(self.in_chans, h, w)
            out[k, :, :bottom - top, :right - left] = image[:, top:bottom, left:right]
        return out, sizes

    def crops(self, idx: torch.Tensor, boxes: tuple[torch.Tensor, ...], flip: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Boxes (cx, cy, w, h) in fractions of each original image [B] each, resampled to S × S as PIL would
        resample them from the original file -> float32 [B, C, S, S] in [0, 1] on the cache's device.

        Only each box's window (the box and the filter's reach around it) is copied and resampled."""
        from d2mae.resample import BICUBIC_SUPPORT, crop_resize

        idx = idx.cpu()
        cx, cy, w, h = (b.double().cpu() for b in boxes)
        shapes = self.shapes[idx]
        hs, ws = shapes[:, 0].double(), shapes[:, 1].double()
        pixels = torch.stack([(cx - w / 2) * ws, (cy - h / 2) * hs, (cx + w / 2) * ws, (cy + h / 2) * hs], 1)
        reach = BICUBIC_SUPPORT * torch.stack([w * ws, h * hs], 1).div(self.img_size).clamp_min(1.0) + 1  # [B, 2]
        lo = torch.floor(pixels[:, :2] - reach).clamp_min(0).long()  # [B, 2] (left, top)
        hi = torch.minimum(torch.ceil(pixels[:, 2:] + reach).long(), shapes.flip(1))  # [B, 2] (right, bottom)
        windows = torch.stack([lo[:, 1], hi[:, 1], lo[:, 0], hi[:, 0]], 1)  # [B, 4] top, bottom, left, right
        images, sizes = self.gather(idx, windows)
        local = pixels - torch.cat([lo, lo], 1).double()  # the boxes in window coordinates
        return crop_resize(images, sizes, local, self.img_size, flip)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None,
              scale: tuple[float, float] = CROP_SCALE, hflip: float = 0.5) -> torch.Tensor:
        """MAE-augmented images for indices ``idx`` [B] (RandomResizedCrop + flip) -> float32 [B, C, S, S]."""
        idx = idx.cpu()
        boxes = crop_boxes(self.aspect[idx], scale, CROP_RATIO, generator)
        flip = torch.rand(len(idx), generator=generator) < hflip
        return self.crops(idx, boxes, flip)

    def center(self, idx: torch.Tensor) -> torch.Tensor:
        """The deterministic view for indices ``idx`` [B] -> float32 [B, C, S, S]."""
        idx = idx.cpu()
        return self.crops(idx, center_fractions(self.aspect[idx]))
