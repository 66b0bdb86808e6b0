"""Write a store from numpy arrays: for tests, and for users whose activations come from elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from visionsae.store.layout import StoreSpec
from visionsae.store.reader import Store, open_store
from visionsae.store.writer import StoreWriter, layer_specs_from_arrays


def write_array_store(path: str | Path, acts: Mapping[str, np.ndarray], labels: np.ndarray | None = None, *,
                      tokens_per_image: int = 1, dtype: str = "float32", format: str = "zarr",
                      images_per_shard: int = 256, classes: Sequence[str] | None = None,
                      image_index: np.ndarray | None = None, valid: np.ndarray | None = None,
                      dataset_id: str = "arrays", split: str = "train", backbone_id: str = "arrays",
                      backbone_fingerprint: str | None = None, overwrite: bool = False) -> Store:
    """Store ``acts`` ({layer: [n_images * tokens_per_image, d]}) as a complete store and open it.

    ``backbone_fingerprint`` names the function that computed the activations (any string that changes
    with it); stores that share it and their layers' shapes are siblings, so an SAE trained on one can be
    evaluated on the other (cache_layout.md, section 9). None: the store is only ever its own match."""
    first = next(iter(acts.values()))
    n_images = first.shape[0] // tokens_per_image
    labels = np.full(n_images, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    image_index = np.arange(n_images, dtype=np.int64) if image_index is None else np.asarray(image_index)
    valid = np.ones(n_images, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    layers = layer_specs_from_arrays(acts, n_images, tokens_per_image)
    if classes is None:
        classes = [str(c) for c in range(int(labels.max()) + 1)] if n_images and labels.max() >= 0 else []
    spec = StoreSpec(
        backbone={"id": backbone_id, "weights": "arrays", "fingerprint": backbone_fingerprint,
                  "preprocessing": None},
        dataset={"id": dataset_id, "root": None, "split": split, "n_images": n_images, "classes": list(classes)},
        tokens="all" if tokens_per_image > 1 else "cls", dtype=dtype, layers=layers,
        images_per_shard=images_per_shard, extract={}, format=format)
    writer = StoreWriter.create(path, spec, mode="overwrite" if overwrite else "new")
    try:
        for s in range(writer.n_shards):
            a, b = writer.shard_slots(s)
            writer.write_shard(s, index=image_index[a:b], label=labels[a:b], valid=valid[a:b],
                               acts={name: arr[a * tokens_per_image:b * tokens_per_image]
                                     for name, arr in acts.items()})
        writer.finalize()
    finally:
        writer.close()
    return open_store(path)
