"""Image-level vectors: what the Monosemanticity Score compares images with, and the raw probe's input.

A layer with one row per image gives that row. A token layer gives its class token where it has
one (token_kind ``all``: class token first) and otherwise the mean of its tokens (``patches``,
``spatial``). ``--ms-embeddings`` swaps in another store of another backbone over the same images,
joined on the dataset index of each slot (``store.image_index``).

Shape suffixes: R rows (I images x T tokens), I images, D width, E embedding width.
"""

from __future__ import annotations

import numpy as np
import torch

from visionsae.errors import StoreError, UserError
from visionsae.store import Store, open_store


def image_vectors(x_RD: torch.Tensor, tokens_per_image: int, token_kind: str) -> torch.Tensor:
    """[I, D] image-level vectors from the rows of I whole images."""
    if tokens_per_image == 1:
        return x_RD
    x_ITD = x_RD.view(-1, tokens_per_image, x_RD.shape[1])
    # A copy, not a view: a caller that keeps the vectors (the raw probe keeps the probe-training images')
    # must not keep every row of the batch alive with them (T x the memory: 6 GB at 10,000 ViT images).
    return x_ITD[:, 0].clone() if token_kind == "all" else x_ITD.mean(1)


class OtherEmbeddings:
    """Image-level vectors from a second store over the same dataset, looked up by dataset index."""

    def __init__(self, path: str, layer: str | None, store: Store):
        self.store = open_store(path)
        mine, theirs = store.dataset, self.store.dataset
        if (mine.get("id"), mine.get("split")) != (theirs.get("id"), theirs.get("split")):
            raise UserError(f"--ms-embeddings store {path} covers dataset {theirs.get('id')}/{theirs.get('split')}, "
                            f"the evaluated store {mine.get('id')}/{mine.get('split')}: extract the same images")
        self.layer = self.store.layer(layer or _embedding_layer(self.store)).name
        self.info = self.store.layer(self.layer)
        index, valid = self.store.image_index, self.store.valid
        order = np.argsort(index[valid], kind="stable")
        self._index = index[valid][order]
        self._slot = np.nonzero(valid)[0][order]
        self.label = f"{self.store.backbone.get('id')} ({path}, layer {self.layer})"

    @property
    def d(self) -> int:
        return self.info.d

    def slots_for(self, dataset_index: np.ndarray) -> np.ndarray:
        """Slot in the second store of each dataset index; -1 where it has no valid image."""
        dataset_index = np.asarray(dataset_index, dtype=np.int64)
        if len(self._index) == 0:
            return np.full(dataset_index.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._index, dataset_index), len(self._index) - 1)
        return np.where(self._index[pos] == dataset_index, self._slot[pos], -1)

    def vectors(self, other_slots: np.ndarray, max_rows: int | None = None) -> np.ndarray:
        """[I, E] image vectors of those slots, read ``max_rows`` store rows at a time (whole images): that
        store may hold many more tokens per image than the evaluated layer, whose batch sizes the call."""
        T = self.info.tokens_per_image
        step = max(1, (max_rows or len(other_slots) * T) // T)
        parts = [image_vectors(torch.from_numpy(self.store.read_slots(self.layer, other_slots[a:a + step])), T,
                               self.info.token_kind).numpy() for a in range(0, len(other_slots), step)]
        return np.concatenate(parts) if parts else np.zeros((0, self.d), dtype=np.float32)


def _embedding_layer(store: Store) -> str:
    if len(store.layer_names) == 1:
        return store.layer_names[0]
    kinds = [n for n in store.layer_names if store.layer(n).kind == "embedding"]
    if len(kinds) == 1:
        return kinds[0]
    raise StoreError(f"{store.path} holds several layers ({', '.join(store.layer_names)}): choose the one to use "
                     "as image embeddings with --ms-embeddings-layer")
