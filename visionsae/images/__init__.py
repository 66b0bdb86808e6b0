"""Reading images: the datasets, their class names, and the image behind a store row.

The third contract beside ``store/`` and ``sae/``: sae-extract reads images here to run the backbone, and
sae-eval reads the same images here for thumbnails and heatmaps, so the two can never number them
differently. It imports nothing of the stages.
"""

from visionsae.images.classes import FASHION_MNIST_CLASSES, synset_names
from visionsae.images.datasets import (DATASETS, FASHION_MNIST_ROOT, READ_ERRORS, SPLITS, ImageSource, even_subset,
                                       open_dataset)

__all__ = ["DATASETS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "READ_ERRORS", "SPLITS", "ImageSource",
           "even_subset", "open_dataset", "synset_names"]
