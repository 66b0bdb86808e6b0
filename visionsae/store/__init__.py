"""The activation store: the contract between sae-extract and sae-train / sae-eval.

See cache_layout.md at the repository root for the normative format. ``open_store(path)`` is the entry
point: ``read_rows`` / ``read_slots`` give float32 whatever the stored dtype; ``shard_array`` gives the
stored words (``to_float32(a, store.dtype)`` converts them).

Without visionsae, a store opens in plain zarr or xarray (``xarray.open_zarr(path, group="layers/<L>")``,
``xarray.open_datatree(path, engine="zarr")``). A ``bfloat16`` store's ``acts`` then read as ``uint16``
(the upper half of each float32); one line of numpy views them as the float32 values, exactly::

    acts_f32 = (a.astype(np.uint32) << 16).view(np.float32)
"""

from visionsae.store.layout import (FORMAT, FORMAT_VERSION, LayerSpec, StoreSpec, to_float32, to_storage,
                                    weights_fingerprint)
from visionsae.store.reader import LayerInfo, Store, open_store
from visionsae.store.writer import StoreWriter, is_store
from visionsae.store.arrays import write_array_store

__all__ = ["FORMAT", "FORMAT_VERSION", "LayerInfo", "LayerSpec", "Store", "StoreSpec", "StoreWriter",
           "is_store", "open_store", "to_float32", "to_storage", "weights_fingerprint", "write_array_store"]
