"""Image sources, decoding of every pixel format, bad inputs, augmentations, statistics and the decode cache."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from d2mae.data.cache import DecodedCache
from d2mae.data.dataset import ImageDataset, center_box, resize_box
from d2mae.data.decode import check_images, compute_stats, content_hash, load_image
from d2mae.data.sources import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, find_images, split_ref
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.seeds import seed_everything

BUS_BRA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bus-bra"
if not BUS_BRA.is_dir():  # the development checkout sits beside shared/ one level higher
    BUS_BRA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bus-bra"


def gray(path: Path, h: int = 24, w: int = 32, seed: int = 0, mode: str = "L") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert(mode).save(path)
    return path


def write_dicom(path: Path, pixels: np.ndarray | None = None, photometric: str = "MONOCHROME2",
                syntax: str | None = None, encapsulated: list[bytes] | None = None,
                bits_stored: int | None = None, rgb: bool = False) -> Path:
    """A minimal ultrasound DICOM: pixels [H, W] or [F, H, W] (uint8/uint16), [H, W, 3] with ``rgb``, or
    encapsulated (compressed) frames."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    arr = np.asarray(pixels) if pixels is not None else np.zeros((8, 8), np.uint8)
    if rgb:
        ds.Rows, ds.Columns = arr.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.Rows, ds.Columns = arr.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if arr.ndim == 3 and not rgb:
        ds.NumberOfFrames = arr.shape[0]
    if encapsulated is not None:
        ds.PixelData = encapsulate(encapsulated)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif pixels is not None:
        ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------------

def test_extensions_cover_common_formats() -> None:
    for ext in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        assert ext in IMAGE_EXTENSIONS
    assert ".dcm" in DICOM_EXTENSIONS


def test_find_images_folder_sorted_recursive_skips_hidden_and_non_images(tmp_path: Path) -> None:
    gray(tmp_path / "b.png")
    gray(tmp_path / "sub" / "a.jpg")
    gray(tmp_path / ".hidden.png")
    gray(tmp_path / ".cache" / "c.png")
    (tmp_path / "notes.txt").write_text("not an image")
    refs = find_images([tmp_path])
    assert refs == sorted(refs)
    assert [Path(r).name for r in refs] == ["b.png", "a.jpg"]
    assert all(Path(r).is_absolute() for r in refs)


def test_find_images_single_file_and_string(tmp_path: Path) -> None:
    p = gray(tmp_path / "x.png")
    assert find_images(str(p)) == [str(p)]
    assert find_images([p, p]) == [str(p)]


def test_find_images_missing_empty_and_not_image(tmp_path: Path) -> None:
    with pytest.raises(D2maeError, match="does-not-exist"):
        find_images([tmp_path / "does-not-exist"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(D2maeError, match="no images found"):
        find_images([tmp_path / "empty"])
    (tmp_path / "model.bin").write_bytes(b"\0" * 10)
    with pytest.raises(D2maeError, match="model.bin is not an image"):
        find_images([tmp_path / "model.bin"])
    with pytest.raises(D2maeError, match="no image source"):
        find_images([])


def test_find_images_symlink_loop_and_duplicate_links(tmp_path: Path) -> None:
    data = tmp_path / "data"
    gray(data / "a.png")
    gray(data / "sub" / "b.png")
    os.symlink(data, data / "sub" / "loop")          # a folder that contains itself
    os.symlink(data / "a.png", data / "alias.png")    # the same file twice
    refs = find_images([data, data / "sub"])
    assert sorted(os.path.realpath(r) for r in refs) == sorted(
        os.path.realpath(p) for p in (data / "a.png", data / "sub" / "b.png"))


def test_find_images_broken_symlink_is_reported_at_check(tmp_path: Path) -> None:
    gray(tmp_path / "ok.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    refs = find_images([tmp_path])
    assert len(refs) == 2
    with pytest.raises(D2maeError, match="broken.png does not exist"):
        check_images(refs)


def test_find_images_csv_and_txt_lists_relative_to_list(tmp_path: Path) -> None:
    gray(tmp_path / "imgs" / "a.png")
    gray(tmp_path / "imgs" / "b.png", seed=1)
    (tmp_path / "labels.csv").write_text("path,label\nimgs/b.png,benign\nimgs/a.png,malignant\n")
    (tmp_path / "list.txt").write_text("# a comment\nimgs/a.png\n\n")
    (tmp_path / "plain.csv").write_text("imgs/a.png\nimgs/b.png\n")
    refs = find_images([tmp_path / "labels.csv"])
    assert [Path(r).name for r in refs] == ["a.png", "b.png"]
    assert [Path(r).name for r in find_images([tmp_path / "list.txt"])] == ["a.png"]
    assert len(find_images([tmp_path / "plain.csv"])) == 2


def test_find_images_bad_lists(tmp_path: Path) -> None:
    (tmp_path / "nocol.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(D2maeError, match="no 'path' column"):
        find_images([tmp_path / "nocol.csv"])
    (tmp_path / "missing.csv").write_text("path\nnope.png\n")
    with pytest.raises(D2maeError, match=r"missing.csv line 2: .*nope.png does not exist"):
        find_images([tmp_path / "missing.csv"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(D2maeError, match="no images found"):
        find_images([tmp_path / "empty.txt"])


def test_unicode_and_spaces_in_paths(tmp_path: Path) -> None:
    p = gray(tmp_path / "données patient é" / "图像 1.png")
    refs = find_images([tmp_path])
    assert refs == [str(p)]
    assert load_image(refs[0]).shape == (24, 32, 1)
    assert check_images(refs) == refs


# ----------------------------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------------------------

def test_load_8bit_gray_and_rgb(tmp_path: Path) -> None:
    p = gray(tmp_path / "g.png")
    arr = load_image(p)
    assert arr.dtype == np.float32 and arr.shape == (24, 32, 1)
    np.testing.assert_allclose(arr[:, :, 0], np.asarray(Image.open(p)) / 255.0, atol=1e-6)
    rgb = load_image(p, in_chans=3)
    assert rgb.shape == (24, 32, 3) and np.allclose(rgb[..., 0], rgb[..., 2])
    with pytest.raises(D2maeError, match="in_chans"):
        load_image(p, in_chans=2)


def test_load_16bit_png_and_tiff(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 65535], [32768, 5, 60000]], dtype=np.uint16)
    for name in ("a.png", "a.tif"):
        Image.fromarray(values).save(tmp_path / name)
        np.testing.assert_allclose(load_image(tmp_path / name)[:, :, 0], values / 65535.0, rtol=1e-6)


def test_load_float_tiff(tmp_path: Path) -> None:
    unit = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    np.testing.assert_allclose(load_image(tmp_path / "unit.tif")[:, :, 0], unit)  # already in [0, 1]: as is
    wide = np.array([[-5.0, 0.0], [45.0, np.nan]], dtype=np.float32)
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    np.testing.assert_allclose(load_image(tmp_path / "wide.tif")[:, :, 0], [[0.0, 0.1], [1.0, 0.0]], atol=1e-6)
    Image.fromarray(np.full((3, 3), 7.0, np.float32)).save(tmp_path / "const.tif")
    assert load_image(tmp_path / "const.tif").max() == 0.0
    Image.fromarray(np.full((3, 3), np.nan, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(D2maeError, match="nan.tif"):
        load_image(tmp_path / "nan.tif")


def test_load_rgba_cmyk_palette(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (10, 12, 4), dtype=np.uint8))  # RGBA
    rgba.save(tmp_path / "rgba.png")
    expected = np.asarray(rgba.convert("RGB").convert("L")) / 255.0  # alpha dropped, luma of RGB
    np.testing.assert_allclose(load_image(tmp_path / "rgba.png")[:, :, 0], expected, atol=1e-6)
    cmyk = rgba.convert("RGB").convert("CMYK")
    cmyk.save(tmp_path / "cmyk.tif")
    np.testing.assert_allclose(load_image(tmp_path / "cmyk.tif", 3), np.asarray(cmyk.convert("RGB")) / 255.0,
                               atol=1e-6)
    pal = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert Image.open(tmp_path / "pal.png").mode == "P"
    np.testing.assert_allclose(load_image(tmp_path / "pal.png")[:, :, 0], np.asarray(pal.convert("L")) / 255.0,
                               atol=1e-6)
    bw = Image.fromarray(rng.integers(0, 2, (6, 6), dtype=np.uint8) * 255).convert("1")
    bw.save(tmp_path / "bw.png")
    assert set(np.unique(load_image(tmp_path / "bw.png"))) <= {0.0, 1.0}


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((10, 20), np.uint8)
    stored[0, 0] = 255  # top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rot.png", exif=exif)
    arr = load_image(tmp_path / "rot.png")[:, :, 0]
    assert arr.shape == (20, 10)
    np.testing.assert_array_equal(arr, np.rot90(stored, k=-1) / 255.0)


def test_multi_page_tiff_and_animated_gif_give_the_first_frame(tmp_path: Path) -> None:
    pages = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200, 90)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    pages[0].save(tmp_path / "anim.gif", save_all=True, append_images=pages[1:])
    for name in ("pages.tif", "anim.gif"):
        np.testing.assert_allclose(load_image(tmp_path / name), 10 / 255.0, atol=1e-6)


def test_extreme_aspect_ratio_and_one_pixel_images(tmp_path: Path) -> None:
    gray(tmp_path / "strip.png", h=3, w=300)
    gray(tmp_path / "dot.png", h=1, w=1)
    refs = [str(tmp_path / "strip.png"), str(tmp_path / "dot.png")]
    for augment in ("none", "mae", "finetune"):
        ds = ImageDataset(refs, 24, augment=augment)
        assert ds[0][0].shape == ds[1][0].shape == (1, 24, 24)
    cache = DecodedCache(refs, 24)
    assert cache.batch(torch.tensor([0, 1])).shape == (2, 1, 24, 24)
    with pytest.raises(D2maeError, match="none of the 2 images"):  # both below min_size 16
        check_images(refs, skip_bad=True)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_unreadable_file(tmp_path: Path) -> None:
    p = gray(tmp_path / "locked.png")
    p.chmod(0)
    try:
        with pytest.raises(D2maeError, match="cannot read image .*locked.png"):
            load_image(p)
    finally:
        p.chmod(0o644)


def test_small_image_upsampled_but_below_min_size_rejected(tmp_path: Path) -> None:
    p = gray(tmp_path / "tiny.png", h=8, w=10)
    ds = ImageDataset([str(p)], img_size=32)
    assert ds[0][0].shape == (1, 32, 32)
    assert check_images([str(p)], min_size=8) == [str(p)]
    with pytest.raises(D2maeError, match=r"tiny.png is 10x8 pixels, smaller than the minimum 16"):
        check_images([str(p)], min_size=16)


# ----------------------------------------------------------------------------------------------------------------
# bad inputs: each one is a D2maeError naming the file
# ----------------------------------------------------------------------------------------------------------------

def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = gray(tmp_path / "good.png", h=32, w=32)
    data = good.read_bytes()
    files = {
        "zero_byte": tmp_path / "zero.png",
        "truncated": tmp_path / "truncated.png",
        "corrupted": tmp_path / "corrupted.png",
        "text_as_png": tmp_path / "text.png",
        "jpeg_truncated": tmp_path / "trunc.jpg",
        "folder_named_png": tmp_path / "folder.png",
    }
    files["zero_byte"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) // 2])
    corrupted = bytearray(data)
    for i in range(60, len(corrupted) - 20, 7):
        corrupted[i] ^= 0x5A
    files["corrupted"].write_bytes(bytes(corrupted))
    files["text_as_png"].write_text("this is not an image\n")
    buf = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, quality=90)
    files["jpeg_truncated"].write_bytes(buf.read_bytes()[:300])
    buf.unlink()
    files["folder_named_png"].mkdir()
    return files


def test_each_bad_file_raises_d2mae_error_naming_it(tmp_path: Path) -> None:
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(D2maeError) as info:
            load_image(path)
        assert path.name in str(info.value), kind
        assert "\n" not in str(info.value), kind


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(D2maeError, match="nope.png does not exist"):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = gray(tmp_path / "bomb.png", h=40, w=40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 px > 2 × limit: PIL's DecompressionBombError
    with pytest.raises(D2maeError, match=r"bomb.png is too large to decode safely"):
        load_image(p)


def test_check_images_stops_at_first_bad(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    refs = [str(tmp_path / "good.png"), str(files["truncated"]), str(files["zero_byte"])]
    with pytest.raises(D2maeError, match=r"truncated.png.*skip-bad"):
        check_images(refs)


def test_check_images_skip_bad_warns_counts_and_writes_list(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    refs = [str(tmp_path / "good.png")] + [str(p) for p in files.values()]
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=rf"skipped {len(files)} of {len(refs)} images .*bad_images.txt"):
        good = check_images(refs, skip_bad=True, out_dir=out)
    assert good == [str(tmp_path / "good.png")]
    lines = (out / "bad_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(str(p) for p in files.values())
    with pytest.raises(D2maeError, match="none of the"):
        check_images([str(files["zero_byte"])], skip_bad=True)


def test_check_images_reports_content_duplicates(tmp_path: Path) -> None:
    a = gray(tmp_path / "a.png")
    (tmp_path / "copy of a.png").write_bytes(a.read_bytes())
    (tmp_path / "copy2.png").write_bytes(a.read_bytes())
    gray(tmp_path / "b.png", seed=3)
    refs = find_images([tmp_path])
    assert len(refs) == 4  # different files: find_images keeps them; check_images reports them
    with pytest.warns(UserWarning, match=r"2 of 4 images duplicate another image"):
        assert check_images(refs, out_dir=tmp_path / "run") == refs
    assert len((tmp_path / "run" / "duplicate_images.txt").read_text().splitlines()) == 2


def test_check_images_empty() -> None:
    with pytest.raises(D2maeError, match="empty"):
        check_images([])


_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(st.binary(min_size=0, max_size=600))
def test_fuzz_random_bytes_as_png(tmp_path: Path, payload: bytes) -> None:
    p = tmp_path / "fuzz.png"
    p.write_bytes(payload)
    try:
        arr = load_image(p)
    except D2maeError as exc:
        assert "fuzz.png" in str(exc)
    else:  # a valid image by chance: still a proper float image
        assert arr.dtype == np.float32 and 0.0 <= arr.min() and arr.max() <= 1.0


@_FUZZ
@given(cut=st.integers(min_value=0, max_value=2000), flips=st.lists(st.integers(0, 4000), max_size=6),
       ext=st.sampled_from([".png", ".jpg", ".tif", ".bmp", ".dcm"]))
def test_fuzz_damaged_real_files(tmp_path: Path, cut: int, flips: list[int], ext: str) -> None:
    src = tmp_path / f"src{ext}"
    if ext == ".dcm":
        write_dicom(src, np.arange(24 * 24, dtype=np.uint8).reshape(24, 24))
    else:
        gray(src, h=24, w=24)
    data = bytearray(src.read_bytes())[: max(1, len(src.read_bytes()) - cut)]
    for f in flips:
        data[f % len(data)] ^= 0xFF
    p = tmp_path / f"damaged{ext}"
    p.write_bytes(bytes(data))
    try:
        good = check_images([str(p)], skip_bad=True, min_size=1)
    except D2maeError as exc:
        assert "damaged" in str(exc)
    else:
        assert good == [str(p)]
        assert load_image(p).dtype == np.float32


# ----------------------------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------------------------

def test_dicom_single_and_multi_frame(tmp_path: Path) -> None:
    frames = (np.arange(3 * 10 * 12).reshape(3, 10, 12) % 256).astype(np.uint8)
    write_dicom(tmp_path / "one.dcm", frames[1])
    write_dicom(tmp_path / "cine.dcm", frames)
    refs = find_images([tmp_path])
    assert [Path(split_ref(r)[0]).name for r in refs] == ["cine.dcm"] * 3 + ["one.dcm"]
    assert [split_ref(r)[1] for r in refs] == [0, 1, 2, None]
    for i in range(3):
        np.testing.assert_allclose(load_image(refs[i])[:, :, 0], frames[i] / 255.0, atol=1e-6)
    np.testing.assert_allclose(load_image(refs[3]), load_image(refs[1]))
    assert content_hash(refs[1]) == hashlib.sha256(frames[1].tobytes()).hexdigest()
    assert content_hash(refs[3]) == hashlib.sha256((tmp_path / "one.dcm").read_bytes()).hexdigest()
    with pytest.raises(D2maeError, match="has 3 frame"):
        load_image(str(tmp_path / "cine.dcm") + "#frame=7")
    assert check_images(refs, min_size=8) == refs
    ds = ImageDataset(refs, img_size=16)
    assert ds[2][0].shape == (1, 16, 16)


def test_dicom_bit_depth_and_monochrome1(tmp_path: Path) -> None:
    values = np.array([[0, 2048], [4095, 1024]], dtype=np.uint16)
    write_dicom(tmp_path / "u12.dcm", values, bits_stored=12)
    np.testing.assert_allclose(load_image(tmp_path / "u12.dcm")[:, :, 0], values / 4095.0, atol=1e-6)
    write_dicom(tmp_path / "m1.dcm", np.array([[0, 255]], dtype=np.uint8), photometric="MONOCHROME1")
    np.testing.assert_allclose(load_image(tmp_path / "m1.dcm")[:, :, 0], [[1.0, 0.0]])
    no_ext = write_dicom(tmp_path / "IM0001", np.array([[0, 255]], dtype=np.uint8))  # DICOMDIR-style name
    assert find_images([tmp_path / "IM0001"]) == [str(no_ext)]
    np.testing.assert_allclose(load_image(no_ext)[:, :, 0], [[0.0, 1.0]])


def test_dicom_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    write_dicom(tmp_path / "rgb.dcm", rgb, rgb=True)
    np.testing.assert_allclose(load_image(tmp_path / "rgb.dcm", 3), rgb / 255.0, atol=1e-6)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    np.testing.assert_allclose(load_image(tmp_path / "rgb.dcm")[:, :, 0], luma, atol=1e-5)


def test_dicom_without_pixel_data_or_undecodable(tmp_path: Path) -> None:
    from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless
    write_dicom(tmp_path / "nopix.dcm", None)
    with pytest.raises(D2maeError, match=r"nopix.dcm has no pixel data"):
        load_image(tmp_path / "nopix.dcm")
    write_dicom(tmp_path / "jls.dcm", np.zeros((8, 8), np.uint8), syntax=JPEGLSLossless, encapsulated=[b"xx"])
    with pytest.raises(D2maeError, match=r"cannot decode the pixel data of DICOM .*jls.dcm .*JPEG-LS"):
        load_image(tmp_path / "jls.dcm")
    write_dicom(tmp_path / "jpg.dcm", np.zeros((8, 8), np.uint8), syntax=JPEGBaseline8Bit,
                encapsulated=[b"\xff\xd8garbage"])
    with pytest.raises(D2maeError, match=r"jpg.dcm"):
        load_image(tmp_path / "jpg.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom at all")
    with pytest.raises(D2maeError, match="junk.dcm"):
        load_image(tmp_path / "junk.dcm")


def test_dicom_without_pydicom_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write_dicom(tmp_path / "x.dcm", np.zeros((4, 4), np.uint8))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(D2maeError, match=r"x.dcm .*pip install d2mae\[dicom\]"):
        load_image(p)
    with pytest.raises(D2maeError, match=r"pip install d2mae\[dicom\]"):
        find_images([tmp_path])


# ----------------------------------------------------------------------------------------------------------------
# datasets and augmentations
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture()
def images(tmp_path: Path) -> list[str]:
    return [str(gray(tmp_path / f"im{i}.png", h=40 + 8 * i, w=56, seed=i)) for i in range(4)]


@pytest.mark.parametrize("augment", ["none", "mae", "finetune"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_dataset_shapes_ranges_and_labels(images: list[str], augment: str, in_chans: int) -> None:
    seed_everything(0)
    ds = ImageDataset(images, img_size=32, in_chans=in_chans, augment=augment, labels=[0, 1, 0, 1])
    assert len(ds) == 4
    for i in range(4):
        x, label, idx = ds[i]
        assert x.shape == (in_chans, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert (label, idx) == ([0, 1, 0, 1][i], i)
    assert ImageDataset(images, 16)[0][1] == -1


def test_dataset_none_view_is_resize_and_centre_crop(tmp_path: Path) -> None:
    img = np.zeros((40, 80), np.uint8)
    img[:, 20:60] = 255  # the centre square is white, the sides black
    Image.fromarray(img).save(tmp_path / "wide.png")
    x = ImageDataset([str(tmp_path / "wide.png")], img_size=20)[0][0]
    assert x.shape == (1, 20, 20)
    assert float(x[..., 1:-1].min()) > 0.98 and float(x.min()) > 0.9  # bicubic softens the outermost columns


def test_augment_determinism_by_seed(images: list[str]) -> None:
    for augment in ("mae", "finetune"):
        ds = ImageDataset(images, img_size=32, augment=augment)
        seed_everything(5)
        a = torch.stack([ds[i][0] for i in range(4)])
        seed_everything(5)
        b = torch.stack([ds[i][0] for i in range(4)])
        seed_everything(6)
        c = torch.stack([ds[i][0] for i in range(4)])
        assert torch.equal(a, b) and not torch.equal(a, c)
    ds = ImageDataset(images, img_size=32)
    assert torch.equal(ds[1][0], ds[1][0])


@pytest.mark.parametrize("in_chans", [1, 3])
def test_rand_augment_every_op_runs_on_grayscale_and_rgb(images: list[str], in_chans: int) -> None:
    """timm's RandAugment on mode 'L' needs an integer fill; every op must keep the mode and size."""
    ds = ImageDataset(images, img_size=32, in_chans=in_chans, augment="finetune")
    img = Image.open(images[0]).convert("L" if in_chans == 1 else "RGB").resize((32, 32))
    ops = ds.rand_augment.ops
    assert len(ops) >= 14
    for op in ops:
        op.prob = 1.0
        out = op(img)
        assert out.mode == img.mode and out.size == img.size, op.name


def test_finetune_options_and_bad_options(images: list[str]) -> None:
    ds = ImageDataset(images, img_size=32, augment="finetune",
                      finetune_kwargs={"auto_augment": "none", "reprob": 0.0, "hflip": 0.0, "scale": (1.0, 1.0),
                                       "ratio": (1.0, 1.0)})
    assert ds.rand_augment is None
    with pytest.raises(D2maeError, match="unknown fine-tuning augmentation option"):
        ImageDataset(images, 32, augment="finetune", finetune_kwargs={"mixup": 0.8})
    with pytest.raises(D2maeError, match="RandAugment policy"):
        ImageDataset(images, 32, augment="finetune", finetune_kwargs={"auto_augment": "bogus"})
    with pytest.raises(D2maeError, match="unknown augmentation"):
        ImageDataset(images, 32, augment="heavy")
    with pytest.raises(D2maeError, match="2 labels for 4 images"):
        ImageDataset(images, 32, labels=[0, 1])


def test_dataset_is_picklable_and_works_with_workers(images: list[str]) -> None:
    ds = ImageDataset(images, img_size=32, augment="finetune", labels=[0, 1, 0, 1])
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.refs == ds.refs
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    x, y, idx = batches[0]
    assert x.shape == (2, 1, 32, 32) and y.tolist() == [0, 1] and idx.tolist() == [0, 1]


# ----------------------------------------------------------------------------------------------------------------
# statistics and hashes
# ----------------------------------------------------------------------------------------------------------------

def test_compute_stats(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 51, np.uint8)).save(tmp_path / "a.png")    # 0.2
    Image.fromarray(np.full((4, 4), 153, np.uint8)).save(tmp_path / "b.png")   # 0.6
    mean, std = compute_stats(find_images([tmp_path]))
    assert mean == pytest.approx([0.4], abs=1e-6) and std == pytest.approx([0.2], abs=1e-6)
    mean3, std3 = compute_stats(find_images([tmp_path]), in_chans=3)
    assert len(mean3) == 3 and mean3[0] == pytest.approx(0.4, abs=1e-6)
    _, std_const = compute_stats([str(tmp_path / "a.png")])
    assert std_const == [0.001]  # floored: a constant data set still normalises
    with pytest.raises(D2maeError, match="empty"):
        compute_stats([])


def test_compute_stats_sample_is_seeded(tmp_path: Path) -> None:
    refs = [str(gray(tmp_path / f"{i}.png", seed=i)) for i in range(8)]
    assert compute_stats(refs, max_images=3, seed=1) == compute_stats(refs, max_images=3, seed=1)
    assert compute_stats(refs, max_images=3, seed=1) != compute_stats(refs, max_images=3, seed=2)


def test_content_hash(tmp_path: Path) -> None:
    p = gray(tmp_path / "a.png")
    assert content_hash(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    with pytest.raises(D2maeError, match="missing.png"):
        content_hash(tmp_path / "missing.png")


# ----------------------------------------------------------------------------------------------------------------
# batched crops and the decode cache
# ----------------------------------------------------------------------------------------------------------------

def test_crop_resize_is_pils_bicubic_resize(tmp_path: Path) -> None:
    """The device resampler reproduces PIL's antialiased bicubic crop-and-resize: shrinking, enlarging, fractional
    boxes, flips, images of different sizes padded into one batch (an accelerator's form) or given one by one (the
    CPU's form), float or uint8."""
    from d2mae.data.resample import crop_resize

    rng = np.random.default_rng(0)
    arrs = [rng.random((h, w, 1), dtype=np.float32) for h, w in ((90, 70), (41, 133), (64, 64))]
    boxes = [(0.0, 0.0, 70.0, 90.0), (10.3, 2.7, 120.2, 40.9), (5.5, 9.25, 25.5, 29.25)]
    batch = torch.zeros(3, 1, 90, 133)
    for k, a in enumerate(arrs):
        batch[k, 0, :a.shape[0], :a.shape[1]] = torch.from_numpy(a[:, :, 0])
    sizes = torch.tensor([a.shape[:2] for a in arrs])
    flip = torch.tensor([False, True, False])
    each = [torch.from_numpy(a[:, :, 0])[None] for a in arrs]  # [1, h, w] each, no padding
    as_uint8 = [torch.from_numpy(np.rint(a * 255).astype(np.uint8)) for a in arrs]
    for s in (24, 48, 200):
        box = torch.tensor(boxes, dtype=torch.float64)
        for images in (batch, each):
            out = crop_resize(images, sizes, box, s, flip)
            for k, a in enumerate(arrs):
                ref = resize_box(a, boxes[k], s, flip=bool(flip[k]))
                assert float((out[k] - torch.from_numpy(ref)).abs().max()) < 1e-5
        out = crop_resize([u.permute(2, 0, 1) for u in as_uint8], sizes, box, s, flip)
        for k, u in enumerate(as_uint8):
            ref = resize_box(u.numpy().astype(np.float32) / 255, boxes[k], s, flip=bool(flip[k]))
            assert float((out[k] - torch.from_numpy(ref)).abs().max()) < 1e-5


def test_decoded_cache_shapes_labels_and_errors(images: list[str]) -> None:
    cache = DecodedCache(images, img_size=32, labels=[0, 1, 1, 0])
    assert cache.shapes.tolist() == [[40, 56], [48, 56], [56, 56], [64, 56]]  # native: these images are small
    assert cache.nbytes == sum(h * 56 for h in (40, 48, 56, 64)) and len(cache) == 4
    torch.testing.assert_close(cache.aspect, torch.tensor([56 / 40, 56 / 48, 56 / 56, 56 / 64]))
    batch = cache.batch(torch.tensor([0, 2, 3]), generator=torch.Generator().manual_seed(0))
    assert batch.shape == (3, 1, 32, 32) and 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    again = cache.batch(torch.tensor([0, 2, 3]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch, again)
    assert cache.labels.tolist() == [0, 1, 1, 0]
    with pytest.raises(D2maeError, match="empty"):
        DecodedCache([], 32)


def test_sharp_deterministic_views_are_the_same_pixels(images: list[str]) -> None:
    """OBS, validation/test and predict all use ImageDataset's deterministic view; the cache's centre view is the
    same pixels (to 1e-6), so σ* is measured on exactly what the classifier later sees."""
    ds = ImageDataset(images, img_size=32)
    cache = DecodedCache(images, img_size=32)
    centre = cache.center(torch.arange(4))
    for i, ref in enumerate(images):
        a = load_image(ref)
        expected = resize_box(a, center_box(*a.shape[:2]), 32)
        assert float((ds[i][0] - torch.from_numpy(expected)).abs().max()) == 0.0
        assert float((centre[i] - torch.from_numpy(expected)).abs().max()) <= 1e-6


def _busbra_refs(root: Path, n: int = 6) -> list[str]:
    refs = find_images([root / "images"])
    return refs[:: len(refs) // n][:n]


def _cache_sigmas(cache: DecodedCache, refs: list[str], area: float, size: int) -> list[float]:
    """Equivalent σ of the cache's crops of ``area`` (narrowest allowed aspect, centred) against PIL's crop of the
    original file, the same box."""
    from d2mae.data.sharpness import equivalent_sigma

    out = []
    for i, ref in enumerate(refs):
        a = load_image(ref)
        h, w = a.shape[:2]
        wf = min(1.0, (area * 0.75 / (w / h)) ** 0.5)
        hf = min(1.0, (area * (w / h) / 0.75) ** 0.5)
        box = ((0.5 - wf / 2) * w, (0.5 - hf / 2) * h, (0.5 + wf / 2) * w, (0.5 + hf / 2) * h)
        view = cache.crops(torch.tensor([i]), tuple(torch.tensor([v]) for v in (0.5, 0.5, wf, hf)))[0]
        out.append(equivalent_sigma(view, resize_box(a, box, size)))
    return out


@pytest.mark.parametrize("size", [96, 224])
@pytest.mark.parametrize("area", [1.0, 0.2])
def test_sharp_memory_cache_target_on_busbra(busbra: Path, size: int, area: float) -> None:
    """The un-blurred target of the memory path is as sharp as PIL's crop of the original (σ ≤ 0.1 px), for
    whole-image and 0.2-area crops of real images (the 1.15 × S cache it replaced gave 0.32 and 0.98 px)."""
    refs = _busbra_refs(busbra)
    sigmas = _cache_sigmas(DecodedCache(refs, size), refs, area, size)
    assert max(abs(s) for s in sigmas) <= 0.1, sigmas


def test_sharp_memory_cache_caps_large_images(busbra: Path, tmp_path: Path) -> None:
    """Sources much larger than the model input are stored below native resolution, and still give crops within
    0.1 px of PIL's crop of the full-resolution file."""
    refs = []
    for ref in _busbra_refs(busbra, 3):
        with Image.open(ref) as im:
            big = im.resize((im.width * 3, im.height * 3), Image.Resampling.LANCZOS)
        refs.append(str(tmp_path / Path(ref).name))
        big.save(refs[-1])
    cache = DecodedCache(refs, 96)
    assert bool((cache.shapes < cache.original).all())  # the cap is in force
    for area in (1.0, 0.2):
        sigmas = _cache_sigmas(cache, refs, area, 96)
        assert max(abs(s) for s in sigmas) <= 0.1, (area, sigmas)


# ----------------------------------------------------------------------------------------------------------------
# real data (BUS-BRA), when present
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (BUS_BRA / "images").is_dir(), reason="BUS-BRA is not available")
def test_bus_bra_smoke() -> None:
    refs = find_images([BUS_BRA / "images"])
    assert len(refs) == 1875
    some = refs[:: len(refs) // 5][:5]
    assert check_images(some) == some
    x = load_image(some[0])
    assert x.ndim == 3 and x.shape[2] == 1 and 0.0 <= x.min() < x.max() <= 1.0
    mean, std = compute_stats(some)
    assert 0.1 < mean[0] < 0.6 and 0.05 < std[0] < 0.4
    for augment in ("none", "mae", "finetune"):
        assert ImageDataset(some, 64, augment=augment)[1][0].shape == (1, 64, 64)
    cache = DecodedCache(some, 64)
    assert cache.batch(torch.arange(5)).shape == (5, 1, 64, 64)
    native = DecodedCache(some, 224)
    assert bool((native.shapes == native.original).all())  # at 224 px BUS-BRA is kept at native resolution
    assert bool((cache.shapes <= cache.original).all())


def test_warnings_are_not_errors_by_default(tmp_path: Path) -> None:
    """check_images' warnings go through the warnings module (callers may log or escalate them)."""
    a = gray(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(a.read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_images(find_images([tmp_path]))
    assert len(caught) == 1
