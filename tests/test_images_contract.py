"""One reader of images: the image sae-extract ran the backbone on (its DataLoader dataset, SlotImages)
and the thumbnail sae-eval shows for the same store row are the same pixels, for each dataset kind."""

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_tree
from visionsae.evaluate.thumbs import ThumbnailSource
from visionsae.extract.slots import SlotImages
from visionsae.images import FASHION_MNIST_ROOT, open_dataset


def _both_paths_agree(source, positions) -> None:
    attrs = source.attrs(len(source))  # what the store records under "dataset"
    as_array = lambda img: torch.from_numpy(np.asarray(img.convert("RGB")).copy())  # noqa: E731 (identity transform)
    slots = SlotImages(source, np.asarray(positions), as_array, torch.zeros(1))
    for slot, pos in enumerate(positions):
        extracted, readable, why = slots[slot]
        assert readable, why
        index = int(source.indices[pos])  # the store's image_index of that slot
        h, w = extracted.shape[:2]
        thumb = ThumbnailSource(attrs, size=max(h, w)).png(index)  # native size: no resampling
        assert thumb is not None, f"{attrs['id']} index {index}: no thumbnail"
        shown = np.asarray(Image.open(io.BytesIO(thumb)).convert("RGB"))
        assert np.array_equal(shown, extracted.numpy()), f"{attrs['id']} index {index}: the two paths differ"


@pytest.mark.parametrize("split", ["train", "val"])
def test_digits(split):
    source = open_dataset("digits", split=split)
    _both_paths_agree(source, [0, 7, len(source) - 1])


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")
def test_fashion_mnist():
    source = open_dataset("fashion-mnist", split="val")
    _both_paths_agree(source, [0, 4321, len(source) - 1])


def test_folder_and_imagenet(tmp_path):
    tree = make_image_tree(tmp_path / "tree", per_class=4)
    source = open_dataset("folder", str(tree))
    _both_paths_agree(source, list(range(len(source))))
    make_image_tree(tmp_path / "inet" / "val", classes=("n01440764", "n04133789"), per_class=3, seed=2)
    source = open_dataset("imagenet", str(tmp_path / "inet"), "val")
    _both_paths_agree(source, list(range(len(source))))


def test_cifar10_from_a_generated_batch(tmp_path, monkeypatch):
    # CIFAR-10's python format: pickled dicts in cifar-10-batches-py/; torchvision checks each file's md5
    # against the published archive, which a generated file cannot match, so that check is skipped here.
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batch = {"data": rng.integers(0, 256, (12, 3 * 32 * 32), dtype=np.uint8), "labels": [i % 10 for i in range(12)]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    source = open_dataset("cifar10", str(tmp_path), "val", download=False)
    assert len(source) == 12 and source.classes[3] == "class3"
    _both_paths_agree(source, [0, 5, 11])


def test_a_split_without_the_index_gives_no_thumbnail():
    train = open_dataset("digits", split="train")
    thumbs = ThumbnailSource(train.attrs(len(train)), size=8)
    assert thumbs.png(int(train.indices[-1])) is not None and thumbs.png(int(train.indices[-1]) + 1) is None
