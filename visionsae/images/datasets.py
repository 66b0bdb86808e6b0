"""Image datasets: each item is an RGB PIL image with its dataset index and label (-1 = none).

The one reader of images: sae-extract runs the backbone on ``load(position)`` and records ``indices`` as the
store's ``image_index``; sae-eval re-reads the image behind a store row with ``image_at(index)``. The
numbering below is the store's contract (cache_layout.md section 2).

- ``digits``: scikit-learn's 1797 8x8 digits (offline). They have no official split: ``train`` is the
  first 4/5 (indices 0..1436), ``val`` the rest; the recorded index is the index in load_digits().
- ``fashion-mnist``: the idx files of Zalando's Fashion-MNIST (``train`` 60k, ``val`` = the 10k test
  set), from the Debian package dataset-fashion-mnist or ``--data-root``.
- ``cifar10``: torchvision's CIFAR-10 (``val`` = the test batch), downloaded when online (``download=True``).
- ``imagenet``: class folders under ``<data-root>/<split>/<class>/``.
- ``folder``: any image tree under ``<data-root>``; first-level subfolder names are the labels.
File datasets are ordered by their sorted relative paths; the index is the position in that order.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visionsae.errors import UserError
from visionsae.images.classes import FASHION_MNIST_CLASSES, synset_names

DATASETS = ("digits", "fashion-mnist", "cifar10", "imagenet", "folder")
SPLITS = ("train", "val")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # the Debian package dataset-fashion-mnist
# What a corrupt or unreadable image file raises while PIL opens or decodes it.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageSource:
    """An ordered list of images: ``load(i)`` for i in range(len(self)), ``indices[i]``, ``labels[i]``."""

    def __init__(self, dataset_id: str, root: str | None, split: str, classes: list[str],
                 indices: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None):
        self.id, self.root, self.split, self.classes = dataset_id, root, split, classes
        self.class_names = class_names  # readable names where ``classes`` are ids (ImageNet synsets)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def position(self, index: int) -> int | None:
        """The position of dataset index ``index`` (a store's ``image_index``), None if this split lacks it.
        Every source lists its indices in increasing order, so this is a binary search."""
        pos = int(np.searchsorted(self.indices, index))
        return pos if pos < len(self.indices) and int(self.indices[pos]) == int(index) else None

    def image_at(self, index: int) -> Image.Image | None:
        """The RGB image whose dataset index is ``index``; None if this split lacks it. Unreadable files
        raise one of READ_ERRORS."""
        pos = self.position(index)
        return None if pos is None else self.load(pos)

    def describe(self, i: int) -> str:
        return f"{self.id} image {int(self.indices[i])}"

    def attrs(self, n_images: int) -> dict[str, Any]:
        out = {"id": self.id, "root": self.root, "split": self.split, "n_images": int(n_images),
               "classes": list(self.classes)}
        if self.class_names is not None:  # only then: stores of other datasets keep their exact bytes
            out["class_names"] = list(self.class_names)
        return out


class ArraySource(ImageSource):
    """Images held in memory as uint8 [n, H, W] (grey) or [n, H, W, 3]."""

    def __init__(self, images: np.ndarray, **kw: Any):
        super().__init__(**kw)
        self.images = images

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")


class FileSource(ImageSource):
    def __init__(self, files: list[Path], **kw: Any):
        super().__init__(**kw)
        self.files = files

    def load(self, i: int) -> Image.Image:
        with Image.open(self.files[i]) as img:
            return img.convert("RGB")  # convert() decodes the whole file, so truncation shows here

    def describe(self, i: int) -> str:
        return str(self.files[i])


def open_dataset(name: str, data_root: str | None = None, split: str = "train", *,
                 download: bool = True) -> ImageSource:
    """``download=False``: never fetch (a reader re-opening what a store records must not download)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
    if name == "cifar10":
        return _cifar10(data_root, split, download)
    return {"digits": _digits, "fashion-mnist": _fashion_mnist, "imagenet": _imagenet,
            "folder": _folder}[name](data_root, split)


def even_subset(n: int, limit: int | None) -> np.ndarray:
    """``limit`` positions spread evenly over ``range(n)``: deterministic, and it covers every class
    of a dataset stored class by class (ImageNet folders), which the first ``limit`` would not."""
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return (np.arange(limit, dtype=np.int64) * n) // limit


def _digits(data_root: str | None, split: str) -> ImageSource:
    from sklearn.datasets import load_digits
    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink -> 0..255 grey
    n_train = len(grey) * 4 // 5
    idx = np.arange(n_train) if split == "train" else np.arange(n_train, len(grey))
    return ArraySource(grey[idx], dataset_id="digits", root=None, split=split,
                       classes=[str(c) for c in digits.target_names], indices=idx, labels=digits.target[idx])


def _fashion_mnist(data_root: str | None, split: str) -> ImageSource:
    root = Path(data_root or FASHION_MNIST_ROOT)
    prefix = "train" if split == "train" else "t10k"

    def find(kind: str) -> Path:
        for name in (f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"):
            if (root / name).is_file():
                return root / name
        raise UserError(f"Fashion-MNIST not found: expected {prefix}-{kind}-ubyte.gz in {root}; install the Debian "
                        "package dataset-fashion-mnist, or download the four idx files from "
                        "github.com/zalandoresearch/fashion-mnist and pass --data-root DIR")

    images, labels = _read_idx(find("images-idx3")), _read_idx(find("labels-idx1"))
    if images.ndim != 3 or labels.shape != (len(images),):
        raise UserError(f"the Fashion-MNIST files in {root} do not match (images {images.shape}, labels "
                        f"{labels.shape}): download them again")
    return ArraySource(images, dataset_id="fashion-mnist", root=str(root), split=split,
                       classes=FASHION_MNIST_CLASSES, indices=np.arange(len(images)), labels=labels)


def _read_idx(path: Path) -> np.ndarray:
    """The MNIST idx format: magic (0, 0, type 0x08 = uint8, n dims), big-endian dims, then the bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read {path} ({err}): download it again") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise UserError(f"{path} is not an idx file of uint8: download it again")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated ({body.size} of {int(np.prod(shape))} bytes): download it again")
    return body.reshape(shape)


def _cifar10(data_root: str | None, split: str, download: bool) -> ImageSource:
    from torchvision.datasets import CIFAR10
    root = Path(data_root or Path.home() / ".cache" / "visionsae" / "cifar10")
    train = split == "train"
    try:
        ds = CIFAR10(str(root), train=train, download=False)
    except RuntimeError:  # not there (or damaged): fetch it, which works only online
        if not download:
            raise UserError(f"CIFAR-10 not found under {root} on this machine") from None
        try:
            ds = CIFAR10(str(root), train=train, download=True)
        except Exception as err:  # urllib / socket / tarfile errors all mean "not available here"
            raise UserError(f"CIFAR-10 not found in {root} and it could not be downloaded ({type(err).__name__}); "
                            "download cifar-10-python.tar.gz from cs.toronto.edu/~kriz/cifar.html, extract it into "
                            "a folder and pass --data-root FOLDER") from None
    return ArraySource(ds.data, dataset_id="cifar10", root=str(root), split=split, classes=list(ds.classes),
                       indices=np.arange(len(ds.data)), labels=np.asarray(ds.targets))


def _imagenet(data_root: str | None, split: str) -> ImageSource:
    if not data_root:
        raise UserError("imagenet needs --data-root DIR holding <split>/<class>/<image> folders (ILSVRC2012 from "
                        "image-net.org, with val sorted into class folders)")
    where = Path(data_root) / split
    if not where.is_dir():
        raise UserError(f"ImageNet not found: expected class folders in {where} (<data-root>/{split}/<class>/"
                        "<image>); download ILSVRC2012 from image-net.org, sort val into class folders, and pass "
                        "--data-root")
    return _tree("imagenet", where, data_root, split)


def _folder(data_root: str | None, split: str) -> ImageSource:
    if not data_root or not Path(data_root).is_dir():
        raise UserError(f"folder needs --data-root DIR, an image tree whose subfolder names are the labels"
                        f"{'' if not data_root else f'; {data_root} is not a directory'}")
    return _tree("folder", Path(data_root), data_root, split)


def _tree(dataset_id: str, where: Path, data_root: str, split: str) -> ImageSource:
    exts = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = sorted((p for p in where.rglob("*") if p.suffix.lower() in exts and p.is_file()),
                   key=lambda p: p.relative_to(where).as_posix())
    if not files:
        raise UserError(f"no image files under {where}: put images in <class>/ subfolders there "
                        f"({', '.join(sorted(exts)[:6])}, ...)")
    rel = [p.relative_to(where).parts for p in files]
    classes = sorted({parts[0] for parts in rel if len(parts) > 1})
    lookup = {c: k for k, c in enumerate(classes)}
    labels = np.array([lookup[parts[0]] if len(parts) > 1 else -1 for parts in rel], dtype=np.int64)
    return FileSource(files, dataset_id=dataset_id, root=str(data_root), split=split, classes=classes,
                      indices=np.arange(len(files)), labels=labels, class_names=synset_names(classes))
