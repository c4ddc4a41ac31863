"""Images as model inputs: the deterministic view and the augmentations of pre-training and fine-tuning.

The loaders only decode and crop: every image leaves as float32 ``[C, S, S]`` in [0, 1]. Blurring at σ_t and
normalisation with the data set's mean/std happen inside the model, on its device (:mod:`d2mae.method.models`), so
one loader serves MAE, DeblurrMAE and D²MAE alike (Section 2.2).

Views. Every path resamples with PIL's antialiased bicubic filter from the original resolution: here with PIL itself
(:func:`resize_box`, the reference view), and in the pre-training memory cache (:mod:`d2mae.data.cache`) with the same
filter on the device, so that no data path softens the image D²MAE reconstructs (σ ≤ 0.1 px against the reference,
:mod:`d2mae.data.sharpness`; docs/views.md).
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2

from d2mae.data.decode import load_image
from d2mae.runtime.errors import D2maeError, reason

AUGMENTS = ("none", "mae", "finetune")


CROP_SCALE = (0.2, 1.0)  # MAE pre-training's RandomResizedCrop area range


CROP_RATIO = (3 / 4, 4 / 3)  # and its aspect range (width / height, original pixels)


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
        views: with ``"mae"``, independent crops per image (MoCo v3's two views: 2); items are then [V, C, S, S].
        crop_scale: with ``"mae"``, RandomResizedCrop's area range (``None``: MAE's :data:`CROP_SCALE`; MoCo v3:
            (0.08, 1)).

    ``__getitem__(i)`` returns ``(image [C, S, S], label, i)``. The data set holds only paths and small picklable
    transforms, so it works with DataLoader workers; randomness comes from the torch/python RNGs that the
    DataLoader seeds per worker.
    """

    def __init__(self, refs: Sequence[str], img_size: int, in_chans: int = 1, augment: str = "none",
                 labels: Sequence[int] | None = None, finetune_kwargs: dict[str, Any] | None = None,
                 views: int = 1, crop_scale: tuple[float, float] | None = None) -> None:
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
        self.views = int(views)
        self.crop_scale = tuple(crop_scale or CROP_SCALE)  # None: MAE's
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
                fill = int(kw["fill"])
                hparams = {"translate_const": int(s * 0.45), "img_mean": fill if in_chans == 1 else (fill,) * 3}
                if "mmax" not in str(policy):  # timm clips m to [0, 10]; at m = 10 its increasing posterize keeps
                    hparams["magnitude_max"] = 9.999  # 0 bits, which Pillow >= 10 refuses (ValueError)
                try:
                    self.rand_augment = rand_augment_transform(str(policy), hparams)
                except Exception as exc:  # noqa: BLE001
                    raise D2maeError(f"unknown RandAugment policy '{policy}' ({reason(exc)}); "
                                     "use e.g. rand-m9-mstd0.5-inc1 or none") from None

    def __len__(self) -> int:
        return len(self.refs)

    def view(self, arr: np.ndarray) -> torch.Tensor:
        """Apply this data set's transform to a decoded image float32 [H, W, C] -> [C, S, S] in [0, 1]."""
        s = self.img_size
        if self.augment == "none":
            return torch.from_numpy(resize_box(arr, center_box(arr.shape[0], arr.shape[1]), s))
        if self.augment == "mae":
            crops = []
            for _ in range(self.views):
                i, j, h, w = RandomResizedCrop.get_params(_shape_proxy(arr), scale=list(self.crop_scale),
                                                          ratio=list(CROP_RATIO))
                flip = bool(torch.rand(()) < 0.5)
                crops.append(torch.from_numpy(resize_box(arr, (j, i, j + w, i + h), s, flip=flip)))
            return crops[0] if self.views == 1 else torch.stack(crops)  # [C, S, S] or [V, C, S, S]
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
    with the item's own seed (from :class:`d2mae.data.sampler.EpochBatchSampler`), so its random crop, flip and
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
    reference view every other data path is measured against (:mod:`d2mae.data.sharpness`); the memory cache's crops
    reproduce it on the device (:mod:`d2mae.data.resample`).
    """
    w, h = (size, size) if isinstance(size, int) else size
    out = np.empty((arr.shape[2], h, w), dtype=np.float32)
    for c in range(arr.shape[2]):
        img = Image.fromarray(np.ascontiguousarray(arr[:, :, c], dtype=np.float32))  # mode F
        out[c] = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC, box=tuple(map(float, box))))
    if flip:
        out = np.ascontiguousarray(out[:, :, ::-1])
    return np.clip(out, 0.0, 1.0, out=out)
