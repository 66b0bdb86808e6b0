"""The activation store: the contract between sae-extract and sae-train / sae-eval.

See cache_layout.md at the repository root for the normative format.
"""

from visionsae.store.layout import (FORMAT, FORMAT_VERSION, LayerSpec, StoreSpec, to_float32, to_storage,
                                    weights_fingerprint)
from visionsae.store.reader import LayerInfo, Store, open_store
from visionsae.store.writer import StoreWriter
from visionsae.store.arrays import write_array_store

__all__ = ["FORMAT", "FORMAT_VERSION", "LayerInfo", "LayerSpec", "Store", "StoreSpec", "StoreWriter",
           "open_store", "to_float32", "to_storage", "weights_fingerprint", "write_array_store"]
