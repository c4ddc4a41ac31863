"""Image and mask as model inputs: one geometry for both, bicubic for the image, nearest for the mask.

The model sees the whole image resized to S × S (every pixel gets a prediction; the logits go back to the image's
own size for the metrics, :func:`native_logits`). Training crops a random box of the whole image — its area a
share in ``crop_scale`` of the image's, its aspect jittered by 3/4..4/3 around the image's own — and flips it; the
image is resampled with PIL's antialiased bicubic filter (:func:`d2mae.data.dataset.resize_box`, the reference
view), the mask with nearest neighbour from the same box, so that mask values stay classes and the two stay aligned.
Then the small-data recipe (``augment="strong"``, MONAI's dictionary transforms on both, :func:`strong_augmentation`):
a rotation of up to 15° and a zoom of 0.85-1.15 (bilinear for the image, nearest for the mask), a gamma of 0.7-1.5
and Rician noise (ultrasound's speckle-like, multiplicative-looking noise) on the image only. Blur at σ_t* is the
model's (on the device, the image only; never the mask).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from d2mae.data.dataset import resize_box
from d2mae.data.decode import load_image
from d2mae.segment.masks import read_mask

Box = tuple[float, float, float, float]  # left, top, right, bottom in original pixels


def random_box(h: int, w: int, scale: Sequence[float], generator: torch.Generator | None = None) -> Box:
    """A random crop of an h × w image: area share in ``scale``, aspect 3/4..4/3 × the image's own."""
    u = torch.rand(3, generator=generator).tolist()
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
    cw, ch = min(w, w * math.sqrt(area * ratio)), min(h, h * math.sqrt(area / ratio))
    left = (w - cw) * u[2]
    top = (h - ch) * float(torch.rand((), generator=generator))
    return left, top, left + cw, top + ch


def resize_mask(mask: np.ndarray, box: Box, size: int, flip: bool = False) -> np.ndarray:
    """Class indices uint8 [H, W] → the ``box`` resized to [S, S] by nearest neighbour (values stay classes)."""
    out = np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST, box=box))
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


AUGMENTATIONS = ("strong", "crop", "none")


def strong_augmentation() -> Any:
    """MONAI's joint augmentation of image and mask (module docstring); call ``set_random_state`` per item."""
    from monai.transforms import Compose, RandAdjustContrastd, RandRicianNoised, RandRotated, RandZoomd  # lazy

    both, modes = ("image", "mask"), ("bilinear", "nearest")
    return Compose([RandRotated(both, range_x=math.pi / 12, prob=0.5, mode=modes, padding_mode="zeros"),
                    RandZoomd(both, min_zoom=0.85, max_zoom=1.15, prob=0.5, mode=modes, padding_mode="constant"),
                    RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.5),
                    RandRicianNoised("image", prob=0.3, std=0.03)])


class SegmentDataset(Dataset):
    """Item ``i`` → (image float32 [C, S, S] in [0, 1], mask int64 [S, S], i); with ``augment`` a random crop and
    flip shared by image and mask, and with ``strong`` MONAI's rotation, zoom, gamma and noise too (seeded per item
    by :class:`d2mae.data.dataset.SeededDataset`)."""

    def __init__(self, refs: Sequence[str], masks: Sequence[str], img_size: int, in_chans: int, num_classes: int,
                 augment: bool | str = False, crop_scale: Sequence[float] = (0.5, 1.0), hflip: float = 0.5) -> None:
        self.refs, self.masks = list(refs), list(masks)
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.augment, self.crop_scale, self.hflip = augment not in (False, "none"), tuple(crop_scale), hflip
        self.strong = strong_augmentation() if augment == "strong" else None

    def __len__(self) -> int:
        return len(self.refs)

    def image(self, i: int) -> torch.Tensor:
        """The whole-image view of image ``i``, float32 [C, S, S] (no augmentation; the mask is not read)."""
        return self.image_and_size(i)[0]

    def image_and_size(self, i: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """The whole-image view [C, S, S] of image ``i`` and the image's own size (H, W)."""
        arr = load_image(self.refs[i], self.in_chans)  # [H, W, C]
        h, w = arr.shape[:2]
        return torch.from_numpy(resize_box(arr, (0.0, 0.0, float(w), float(h)), self.img_size)), (h, w)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        arr = load_image(self.refs[i], self.in_chans)  # [H, W, C] in [0, 1]
        mask = read_mask(self.masks[i], self.num_classes)  # [H, W]
        h, w = mask.shape
        box: Box = (0.0, 0.0, float(w), float(h))
        flip = False
        if self.augment:
            box = random_box(h, w, self.crop_scale)
            flip = bool(torch.rand(()) < self.hflip)
        x = resize_box(arr, box, self.img_size, flip=flip)  # [C, S, S]
        y = resize_mask(mask, box, self.img_size, flip=flip)  # [S, S]
        if self.strong is None:
            return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), i
        self.strong.set_random_state(seed=int(np.random.randint(2**31)))  # the item's seed (SeededDataset)
        out = self.strong({"image": torch.from_numpy(x), "mask": torch.from_numpy(y[None].astype(np.float32))})
        image = torch.from_numpy(np.asarray(out["image"], dtype=np.float32)).clamp_(0.0, 1.0)  # [C, S, S]
        return image, torch.from_numpy(np.rint(np.asarray(out["mask"])[0]).astype(np.int64)), i


def native_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits [K, S, S] of the whole-image view → [K, H, W] at the image's own size (bilinear); the truth is never
    resized."""
    return F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
