"""The one interface between the format-neutral store logic (writer.py, reader.py) and a storage format.

A format is a module (``store.zarr``, ``store.hdf5``) that provides the module-level functions of
``Backend``; its writer and reader objects provide ``ChunkWriter`` and ``ChunkReader``. These name
exactly what ``StoreWriter`` and ``Store`` call, nothing more: statistics, record contents, checksums
of what is read, resume checks and error wording for a user stay in writer.py and reader.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from visionsae.store.layout import StoreSpec


class ChunkWriter(Protocol):
    """Write side of one open store: a shard's chunks, its manifest record, and the final attributes."""

    def write_chunks(self, shard: int, index: np.ndarray, label: np.ndarray, valid_u8: np.ndarray,
                     stored: Mapping[str, np.ndarray]) -> dict[str, dict[str, int]]:
        """Write one shard's image arrays and every layer's rows; {chunk key: {nbytes, crc32}} of the bytes."""

    def write_record(self, shard: int, record: dict[str, Any]) -> None:
        """Make shard ``shard`` count as written (after its chunks are durable)."""

    def records(self) -> dict[int, dict[str, Any]]:
        """Every parseable manifest record of shards 0..n_shards-1 (a damaged one counts as not written)."""

    def check_layout(self) -> None:
        """Refuse (StoreError) a skeleton that would not open once complete."""

    def write_final(self, layer_attrs: Mapping[str, dict[str, Any]], means: Mapping[str, np.ndarray],
                    n_skipped: int) -> None:
        """Write every layer's mean and attributes, then mark the store complete, last."""

    def close(self) -> None:
        ...


class ChunkReader(Protocol):
    """Read side of one store: metadata, manifest records and the bytes of chunks."""

    format: str  # "zarr" | "hdf5"

    def root_attrs(self) -> dict[str, Any]: ...

    def layer_attrs(self, name: str) -> dict[str, Any]: ...

    def small_array(self, name: str) -> np.ndarray:
        """A whole one-dimensional array (``images/index``, ``layers/<L>/mean``, ...)."""

    def records(self, n_shards: int | None = None) -> dict[int, dict[str, Any]]:
        """Every parseable record; with ``n_shards``, only those of shards 0..n_shards-1."""

    def image_key(self, name: str, shard: int) -> str: ...

    def acts_key(self, layer: str, shard: int) -> str: ...

    def shard_acts(self, info: Any, shard: int, a: int, b: int, ips: int) -> np.ndarray:
        """Rows a..b (shard ``shard``) of layer ``info``, stored dtype; a memory map where the format allows."""

    def read_acts_into(self, info: Any, shard: int, a: int, b: int, ips: int, out: np.ndarray) -> Any:
        """Fill out[:b - a] with those rows; the bytes the checksum covers (None: the chunk is missing)."""

    def chunk_bytes(self, key: str, start: int, stop: int) -> Any:
        """The bytes the manifest checksum of ``key`` covers (elements start..stop of its array); None: missing."""


class Backend(Protocol):
    """What a format module provides."""

    FORMAT: str

    def create(self, path: Path, spec: StoreSpec) -> ChunkWriter:
        """Lay out a new store at ``path`` (nothing there yet): a path that exists is a whole skeleton."""

    def reopen(self, path: Path, spec: StoreSpec, check_attrs: Callable[[dict[str, Any]], None]) -> ChunkWriter:
        """Open an existing store to write more shards; ``check_attrs`` vets its root attributes first."""

    def is_store(self, path: Path) -> bool: ...

    def open_reader(self, path: Path) -> ChunkReader: ...
