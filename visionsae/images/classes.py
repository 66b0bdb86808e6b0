"""Class names the stores record (cache_layout.md, ``dataset.classes`` and ``dataset.class_names``)."""

from __future__ import annotations

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def synset_names(classes: list[str]) -> list[str] | None:
    """Readable names of WordNet synset ids (``n01440764`` -> ``tench``) from the ImageNet class list timm
    ships; None unless every name is a synset timm knows (folder trees keep their folder names)."""
    if not classes or not all(len(c) == 9 and c[0] == "n" and c[1:].isdigit() for c in classes):
        return None
    try:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()  # the 1000 classes of ILSVRC-2012, else the 21,841 of ImageNet-22k
        if not set(classes) <= set(info.label_names()):
            info = ImageNetInfo("imagenet-22k")
    except (ImportError, OSError, ValueError, KeyError):
        return None
    known = set(info.label_names())
    if not set(classes) <= known:
        return None
    return [info.label_name_to_description(c).split(",")[0].strip() for c in classes]
