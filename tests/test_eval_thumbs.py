"""Thumbnails re-read from the dataset a store records, and the reasons given when they cannot be."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionsae.evaluate.thumbs import ThumbnailSource, model_view
from visionsae.images import FASHION_MNIST_ROOT


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"))


def test_digits_thumbnail_is_the_digit_enlarged():
    from sklearn.datasets import load_digits
    src = ThumbnailSource({"id": "digits", "root": None, "split": "train"}, size=64)
    assert src.unavailable is None
    img = _pixels(src.png(5))
    assert img.shape == (64, 64)  # 8x8 enlarged 8 times, pixel for pixel
    want = np.rint(load_digits().images[5] * 255 / 16).astype(np.uint8)
    assert np.array_equal(img[::8, ::8], want)
    assert src.png(10_000) is None  # outside the dataset


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")
def test_fashion_mnist_thumbnail():
    src = ThumbnailSource({"id": "fashion-mnist", "root": FASHION_MNIST_ROOT, "split": "val"}, size=56)
    img = _pixels(src.png(0))
    assert img.shape == (56, 56) and img.max() > 0


def test_folder_order_is_sorted_relative_paths(tmp_path):
    # sae-extract numbers a tree's images by their sorted relative paths ("a-b/..." before "a/...",
    # which an ImageFolder listing would put the other way round), nested folders included
    greys = {"a/y.png": 30, "a-b/x.png": 10, "a/more/0.png": 40, "b/1.jpg": 50, "top.png": 60, "a-b/w.png": 5}
    for rel, grey in greys.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (100, 50), grey).save(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    src = ThumbnailSource({"id": "folder", "root": str(tmp_path), "split": "train"}, size=40)
    got = [int(_pixels(src.png(i))[10, 10]) for i in range(6)]
    assert got == [greys[k] for k in sorted(greys)] == [5, 10, 40, 30, 50, 60]
    assert src.png(6) is None
    assert Image.open(io.BytesIO(src.png(0))).size == (40, 20)  # shrunk, aspect kept
    (tmp_path / "a-b" / "w.png").write_bytes(b"not an image")
    assert src.png(0) is None  # unreadable file: no thumbnail, no crash


def test_imagenet_reads_the_split_folder(tmp_path):
    for split, grey in (("train", 10), ("val", 20)):
        (tmp_path / split / "n01").mkdir(parents=True)
        Image.new("L", (8, 8), grey).save(tmp_path / split / "n01" / "a.png")
    src = ThumbnailSource({"id": "imagenet", "root": str(tmp_path), "split": "val"}, size=16)
    assert int(_pixels(src.png(0))[0, 0]) == 20


def test_unavailable_datasets_say_why(tmp_path):
    assert "cannot be re-read" in ThumbnailSource({"id": "arrays"}, 32).unavailable
    assert "does not exist" in ThumbnailSource({"id": "imagenet", "root": str(tmp_path), "split": "val"},
                                               32).unavailable
    assert "not found" in ThumbnailSource({"id": "fashion-mnist", "root": str(tmp_path), "split": "val"},
                                          32).unavailable
    src = ThumbnailSource({"id": "folder", "root": None, "split": "all"}, 32)
    assert src.unavailable and src.png(0) is None


def test_thumbnail_shows_the_models_centre_crop(tmp_path):
    # resize the shorter side 50 -> 64 (x1.28), centre-crop 56 x 56: the model sees 43.75 source pixels square
    prep = {"resize": 64, "crop": "center", "image_size": [56, 56]}
    assert model_view((100, 50), prep) == (28, 3, 72, 47)
    assert model_view((100, 50), {"resize": [56, 56], "crop": "center", "image_size": [56, 56]}) is None
    assert model_view((100, 50), {}) is None  # no preprocessing record: the whole image
    img = Image.new("L", (100, 50), 0)
    img.paste(255, (28, 3, 72, 47))  # white exactly where the crop falls
    (tmp_path / "a").mkdir()
    img.save(tmp_path / "a" / "x.png")
    src = ThumbnailSource({"id": "folder", "root": str(tmp_path), "split": "train"}, size=44, preprocessing=prep)
    px = _pixels(src.png(0))
    assert px.shape == (44, 44) and px.min() == 255
