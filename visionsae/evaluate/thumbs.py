"""Thumbnails of the images a store was extracted from, re-read from the dataset it records.

The images come from ``visionsae.images``, the reader sae-extract ran the backbone on, so the dataset
index of a slot (``store.image_index``) names the same image here (cache_layout.md section 2); nothing
is downloaded.

With the store's preprocessing record (``backbone.preprocessing``) a thumbnail shows what the model saw:
the centre crop that the resize-then-crop preprocessing keeps, so token heatmaps lie on the right pixels.

When a dataset cannot be read here (another machine's path, an unknown id), ``ThumbnailSource``
says why in ``unavailable`` and the report shows that sentence instead of pictures.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

from PIL import Image

from visionsae.errors import UserError
from visionsae.images import DATASETS, READ_ERRORS, open_dataset


class ThumbnailSource:
    """``png(dataset_index)`` -> PNG bytes of a ``size``-pixel thumbnail, or None if it cannot be read."""

    def __init__(self, dataset: dict, size: int, preprocessing: dict | None = None):
        self.size = size
        self.preprocessing = preprocessing or {}
        self.unavailable: str | None = None
        self._load: Callable[[int], Image.Image | None] | None = None
        try:
            self._load = _opener(dataset)
        except UserError as err:
            self.unavailable = str(err)

    def png(self, index: int) -> bytes | None:
        if self._load is None or index < 0:
            return None
        try:
            img = self._load(int(index))
        except READ_ERRORS:
            return None
        if img is None:  # not in the recorded split
            return None
        box = model_view(img.size, self.preprocessing)
        if box is not None:
            img = img.crop(box)
        w, h = img.size
        if max(w, h) < self.size:
            # Small images are enlarged by a whole factor without smoothing, so their pixels stay crisp.
            factor = self.size // max(w, h)
            img = img.resize((w * factor, h * factor), Image.NEAREST)
        else:
            img.thumbnail((self.size, self.size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)  # the default 6: 1.4x slower, 7% smaller (measured)
        return buf.getvalue()


def model_view(size: tuple[int, int], prep: dict) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) of an image of ``size`` (w, h) that a resize to ``prep["resize"]``
    (shorter side, or [h, w]) followed by a centre crop to ``prep["image_size"]`` keeps; None: all of it."""
    if prep.get("crop") != "center" or not prep.get("image_size"):
        return None
    w, h = size
    crop_h, crop_w = (int(v) for v in prep["image_size"])
    resize = prep.get("resize")
    if isinstance(resize, int):
        sx = sy = resize / min(w, h)
    elif isinstance(resize, (list, tuple)) and len(resize) == 2:
        sy, sx = resize[0] / h, resize[1] / w
    else:
        sx = sy = 1.0
    bw, bh = min(w, crop_w / sx), min(h, crop_h / sy)
    if bw >= w - 0.5 and bh >= h - 0.5:
        return None
    left, top = (w - bw) / 2, (h - bh) / 2
    return int(round(left)), int(round(top)), int(round(left + bw)), int(round(top + bh))


def _opener(dataset: dict) -> Callable[[int], Image.Image | None]:
    kind, root, split = dataset.get("id"), dataset.get("root"), dataset.get("split")
    if kind not in DATASETS:
        raise UserError(f"dataset '{kind}' cannot be re-read for thumbnails (the store was written from arrays "
                        "or from a source this reader does not know)")
    if root is None and kind in ("cifar10", "imagenet", "folder"):
        raise UserError(f"the store records no root for dataset '{kind}'")
    folder = Path(root) / split if kind == "imagenet" else Path(root or ".")
    if kind in ("imagenet", "folder") and not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist on this machine")
    return open_dataset(kind, root, split, download=False).image_at  # sae-extract's reader: the same numbering
