"""Decoding every kind of pixel data to float32 in [0, 1], checking images before a run, content hashes, statistics.

Every image leaves this module as float32 ``[H, W, C]`` in [0, 1] (:func:`load_image`); one rule per kind of data:

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

Anything that cannot be read raises :class:`~d2mae.runtime.errors.D2maeError` naming the file; :func:`check_images`
opens every image once before training, so a bad file stops a run at its start, or (``skip_bad``) is listed in
``bad_images.txt`` and left out. docs/bad-inputs.md lists every bad input tried and what happens.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from d2mae.data.shards import read_member, split_member
from d2mae.data.sources import DICOM_EXTENSIONS, import_pydicom, is_dicom_bytes, is_dicom_file, split_ref
from d2mae.runtime.errors import D2maeError, reason
from d2mae.runtime.files import atomic_write_text, file_sha256

# ---------------------------------------------------------------------------------------------------------------
# references and sources
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------


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
    pydicom = import_pydicom(path)
    fileobj = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        ds = pydicom.dcmread(fileobj, force=True)
    except Exception as exc:  # noqa: BLE001
        raise D2maeError(f"cannot read DICOM {path}: {reason(exc)}") from None
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
        raise D2maeError(f"cannot decode the pixel data of DICOM {path} ({name}): {reason(exc)}; convert it to "
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
    member = split_member(ref)
    if member is not None:  # an image in a tar shard (d2mae.data.shards): one seek, then as a file's bytes
        data = read_member(ref)
        return _decode_bytes(data, f"{member[0]}:{member[3]}", Path(member[3]).suffix.lower(), in_chans), \
            hashlib.sha256(data).hexdigest()
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
        raise D2maeError(f"cannot read image {path}: {reason(exc)}") from None
    return _decode_bytes(data, path, p.suffix.lower(), in_chans), hashlib.sha256(data).hexdigest()


def _decode_bytes(data: bytes, path: str, suffix: str, in_chans: int) -> np.ndarray:
    """A whole image file's bytes -> float32 [H, W, in_chans] in [0, 1]; errors name ``path``."""
    if not data:
        raise D2maeError(f"image {path} is empty (0 bytes)")
    if is_dicom_bytes(data[:132]) or suffix in DICOM_EXTENSIONS:
        return _decode_dicom(path, data, None, in_chans)[0]
    try:
        return _decode_pil(data, in_chans)
    except Image.DecompressionBombError as exc:
        raise D2maeError(f"image {path} is too large to decode safely ({reason(exc)}); "
                         "downscale it or remove it") from None
    except D2maeError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt data; all mean "cannot read"
        raise D2maeError(f"cannot read image {path}: {reason(exc)}") from None


def load_image(ref: str | Path, in_chans: int = 1) -> np.ndarray:
    """Decode one image reference (a path or ``file.dcm#frame=N``) to float32 ``[H, W, in_chans]`` in [0, 1].

    See the module docstring for how each pixel format is scaled. Raises :class:`D2maeError` naming the file for
    anything that cannot be read: missing, empty, truncated, corrupt, not an image, a decompression bomb (PIL's
    ``Image.MAX_IMAGE_PIXELS`` limit is kept), DICOM without pixel data or with undecodable compressed data.
    """
    return _decode(str(ref), in_chans)[0]


def content_hash(ref: str | Path) -> str:
    """sha256 hex of the file's bytes; for a ``#frame=N`` reference, of that frame's decoded (stored) pixel bytes."""
    if split_member(str(ref)) is not None:  # an image in a shard: its stored bytes (the source file's)
        return hashlib.sha256(read_member(str(ref))).hexdigest()
    path, frame = split_ref(str(ref))
    if frame is not None:
        return _decode(str(ref), 1)[1]
    try:
        return file_sha256(path)
    except OSError as exc:
        raise D2maeError(f"cannot read image {path}: {reason(exc)}") from None


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def map_threads(fn: Callable[[str], Any], refs: Sequence[str]) -> Iterable[Any]:
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
    return list(map_threads(content_hash, list(refs)))


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
    for ref, (digest, error) in zip(refs, map_threads(probe, refs)):
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
        where = _write_list(out_dir, "bad_images.txt", bad)
        if not good:
            raise D2maeError(f"none of the {len(refs)} images could be read (first: {bad[0][1]}){where}")
        warnings.warn(f"skipped {len(bad)} of {len(refs)} images that could not be read (first: {bad[0][1]}){where}",
                      stacklevel=2)
    if duplicates:
        where = _write_list(out_dir, "duplicate_images.txt", duplicates)
        warnings.warn(f"{len(duplicates)} of {len(good)} images duplicate another image's content (e.g. "
                      f"{duplicates[0][0]} == {duplicates[0][1]}); duplicates can leak between train and test "
                      f"splits{where}", stacklevel=2)
    return good


def _write_list(out_dir: str | Path | None, name: str, pairs: list[tuple[str, str]]) -> str:
    """Write ``pairs`` as tab-separated lines to ``out_dir/name``; the words that point a message at the list."""
    if out_dir is None:
        return ""
    target = Path(out_dir) / name
    atomic_write_text(target, "".join(f"{a}\t{b}\n" for a, b in pairs))
    return f"; the list is in {target}"


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
    for arr in map_threads(lambda r: load_image(r, in_chans), refs):
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


# ---------------------------------------------------------------------------------------------------------------
# decode cache and batched crops (pre-training without a DataLoader)
# ---------------------------------------------------------------------------------------------------------------


def image_shape(ref: str) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding the pixels (DICOM: Rows/Columns)."""
    member = split_member(ref)
    source: Any
    if member is not None:  # a shard member: its bytes (one seek), whose header reads as a file's
        data = read_member(ref)
        path, source = f"{member[0]}:{member[3]}", io.BytesIO(data)
        dicom = is_dicom_bytes(data[:132]) or Path(member[3]).suffix.lower() in DICOM_EXTENSIONS
    else:
        path, frame = split_ref(ref)
        source = path
        dicom = frame is not None or Path(path).suffix.lower() in DICOM_EXTENSIONS or is_dicom_file(Path(path))
    if dicom:
        ds = import_pydicom(path).dcmread(source, stop_before_pixels=True, force=True)
        return int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    try:
        with Image.open(source) as im:
            w, h = im.size
            if (im.getexif() or {}).get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation that swaps the axes
                w, h = h, w
            return h, w
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt data
        raise D2maeError(f"cannot read image {path}: {reason(exc)}") from None


