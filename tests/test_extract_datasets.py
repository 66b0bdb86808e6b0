"""Datasets: splits, labels, indices and file order; no model involved."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionsae.errors import UserError
from visionsae.images import FASHION_MNIST_ROOT, even_subset, open_dataset


def test_digits_splits_cover_load_digits_once():
    from sklearn.datasets import load_digits
    train, val = open_dataset("digits", split="train"), open_dataset("digits", split="val")
    assert (len(train), len(val)) == (1437, 360)
    np.testing.assert_array_equal(np.concatenate([train.indices, val.indices]), np.arange(1797))
    np.testing.assert_array_equal(val.labels, load_digits().target[1437:])
    img = val.load(0)
    assert img.mode == "RGB" and img.size == (8, 8)
    grey = np.asarray(img)[..., 0]
    np.testing.assert_array_equal(grey, np.rint(load_digits().images[1437] * 255 / 16).astype(np.uint8))


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    train, val = open_dataset("fashion-mnist", split="train"), open_dataset("fashion-mnist", split="val")
    assert (len(train), len(val)) == (60000, 10000)
    assert val.classes[9] == "Ankle boot" and np.bincount(val.labels).tolist() == [1000] * 10
    assert train.load(0).size == (28, 28) and train.root == FASHION_MNIST_ROOT


def test_imagenet_layout_and_folder_labels(tmp_path, image_tree):
    shutil.copytree(image_tree, tmp_path / "in" / "val")
    Image.new("RGB", (9, 9)).save(tmp_path / "in" / "val" / "loose.png")  # not in a class folder
    ds = open_dataset("imagenet", str(tmp_path / "in"), split="val")
    assert ds.classes == ["circle", "square", "stripes"] and len(ds) == 25
    names = [p.relative_to(tmp_path / "in" / "val").as_posix() for p in ds.files]
    assert names == sorted(names)  # the index is the position in sorted relative-path order
    assert ds.labels[names.index("loose.png")] == -1
    assert ds.labels[names.index("square/more/img_003.jpg")] == 1
    with pytest.raises(UserError, match="ImageNet not found"):
        open_dataset("imagenet", str(tmp_path / "in"), split="train")


def test_even_subset_spreads_over_the_split():
    assert even_subset(10, None).tolist() == list(range(10))
    assert even_subset(10, 50).tolist() == list(range(10))
    picked = even_subset(1000, 7)
    assert picked.tolist() == [0, 142, 285, 428, 571, 714, 857]
    classes = np.repeat(np.arange(10), 100)  # a dataset stored class by class
    assert set(classes[even_subset(1000, 20)]) == set(range(10))


def test_imagenet_synset_folders_get_readable_names(tmp_path, image_tree):
    # ImageNet class folders are WordNet ids: the store records them (classes) and their names (class_names)
    for synset in ("n04133789", "n01440764"):
        (tmp_path / "val" / synset).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / synset / "a.png")
    attrs = open_dataset("imagenet", str(tmp_path), "val").attrs(2)
    assert attrs["classes"] == ["n01440764", "n04133789"] and attrs["class_names"] == ["tench", "sandal"]
    # other trees keep their folder names, and their attributes exactly as before (no class_names key)
    assert "class_names" not in open_dataset("folder", str(image_tree)).attrs(24)
