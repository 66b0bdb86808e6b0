"""The HDF5 form of the store (cache_layout.md section 3): same paths, contiguous datasets.

Single-process: h5py holds the file open for the whole run. Each shard's rows are written, the file
is flushed and fsynced, and only then is the shard's manifest attribute set (and flushed again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from visionsae.errors import StoreError
from visionsae.store.layout import StoreSpec, crc32_of, shard_record_name, storage_dtype


def is_visionsae_h5(path: Path) -> bool:
    import h5py
    try:
        with h5py.File(path, "r") as f:
            return "visionsae" in f.attrs
    except OSError:
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class H5WriterMixin:
    """Backend methods; ``writer.H5Writer`` combines them with StoreWriter (no import cycle)."""

    @classmethod
    def _new(cls, path: Path, spec: StoreSpec):
        import h5py
        if spec.compressed:
            raise StoreError("compressed mode is for Zarr stores; HDF5 stores stay contiguous (memory-mappable)")
        try:
            f = h5py.File(path, "w", track_order=True)
        except OSError as err:
            raise StoreError(f"cannot create the HDF5 store {path}: {err}") from None
        f.attrs["visionsae"] = json.dumps(spec.root_attrs())
        for name, dtype in (("index", "<i8"), ("label", "<i8"), ("valid", "u1")):
            f.create_dataset(f"images/{name}", shape=(spec.n_images,), dtype=dtype, track_times=False)
        for layer in spec.layers:
            g = f.create_group(f"layers/{layer.name}", track_order=True)
            g.attrs["visionsae"] = json.dumps(layer.attrs(spec.dtype))
            g.create_dataset("acts", shape=(spec.n_images * layer.tokens_per_image, layer.d),
                             dtype=storage_dtype(spec.dtype), track_times=False)
            g.create_dataset("mean", shape=(layer.d,), dtype="<f8", track_times=False)
        f.create_group("manifest", track_order=True)
        f.flush()
        writer = cls(path, spec)
        writer._file = f
        return writer

    @classmethod
    def _reopen(cls, path: Path, spec: StoreSpec):
        import h5py
        try:
            f = h5py.File(path, "r+")
        except OSError as err:
            raise StoreError(f"{path} is not a readable HDF5 store ({err}): pass --overwrite to replace it") from None
        if "visionsae" not in f.attrs:
            f.close()
            raise StoreError(f"{path} is not a visionsae activation store: refusing to write into it")
        writer = cls(path, spec)
        writer._file = f
        writer._check_resume_attrs(json.loads(f.attrs["visionsae"]))
        return writer

    def _write_chunks(self, shard, index, label, valid_u8, stored):
        f = self._file
        start, stop = self.shard_slots(shard)
        chunks = {}
        arrays = {"/images/index": (index, start, stop), "/images/label": (label, start, stop),
                  "/images/valid": (valid_u8, start, stop)}
        for layer in self.spec.layers:
            T = layer.tokens_per_image
            arrays[f"/layers/{layer.name}/acts"] = (stored[layer.name], start * T, stop * T)
        try:
            for name, (data, a, b) in arrays.items():
                f[name][a:b] = data
                chunks[name] = {"nbytes": int(data.nbytes), "crc32": crc32_of(data)}
            f.flush()
            _fsync(self.path)
        except OSError as err:
            raise StoreError(f"writing shard {shard} to {self.path} failed ({err}): free space if the disk "
                             "is full, then rerun with --resume") from None
        return chunks

    def _write_record(self, shard, record):
        self._file["manifest"].attrs[shard_record_name(shard)] = json.dumps(record)
        self._file.flush()
        _fsync(self.path)

    def _records(self):
        out = {}
        attrs = self._file["manifest"].attrs
        for s in range(self.n_shards):
            name = shard_record_name(s)
            if name in attrs:
                out[s] = json.loads(attrs[name])
        return out

    def _write_final(self, layer_attrs, means, n_skipped):
        f = self._file
        for name, attrs in layer_attrs.items():
            f[f"layers/{name}/mean"][:] = means[name]
            f[f"layers/{name}"].attrs["visionsae"] = json.dumps(attrs)
        root = json.loads(f.attrs["visionsae"])
        f.flush()
        f.attrs["visionsae"] = json.dumps({**root, "complete": True, "n_skipped": n_skipped})
        f.flush()
        _fsync(self.path)

    def close(self):
        f = getattr(self, "_file", None)
        if f is not None and f.id.valid:
            f.close()


# --- reading -------------------------------------------------------------------------------------
class H5Source:
    """Read access for the reader: attributes, small arrays, and memory maps of ``acts``."""

    def __init__(self, path: Path):
        import h5py
        self.path = path
        try:
            self.file = h5py.File(path, "r")
        except OSError as err:
            raise StoreError(f"{path} is not a readable HDF5 store ({err}): re-extract it with --overwrite") from None
        if "visionsae" not in self.file.attrs:
            raise StoreError(f"{path} is an HDF5 file but not a visionsae activation store")
        self._acts: dict[str, Any] = {}

    def root_attrs(self) -> dict[str, Any]:
        return json.loads(self.file.attrs["visionsae"])

    def layer_attrs(self, name: str) -> dict[str, Any]:
        try:
            return json.loads(self.file[f"layers/{name}"].attrs["visionsae"])
        except KeyError:
            raise StoreError(f"{self.path} lists layer '{name}' but has no /layers/{name}: the store is damaged") from None

    def small_array(self, name: str) -> np.ndarray:
        return self.file[name][()]

    def records(self) -> dict[int, dict[str, Any]]:
        attrs = self.file["manifest"].attrs if "manifest" in self.file else {}
        return {int(k.split("-")[1]): json.loads(v) for k, v in attrs.items()}

    def acts(self, layer: str, dtype: np.dtype) -> np.ndarray:
        dset = self.file[f"layers/{layer}/acts"]
        offset = dset.id.get_offset()
        if offset is None or dset.chunks is not None or dset.compression:
            return dset  # not contiguous on disk (e.g. written by another tool): h5py slicing still works
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=dset.shape)

    def shard_acts(self, info, shard: int, a: int, b: int, ips: int) -> np.ndarray:
        if info.name not in self._acts:
            self._acts[info.name] = self.acts(info.name, storage_dtype(info.dtype))
        arr = self._acts[info.name]
        return arr[a:b] if isinstance(arr, np.memmap) else np.asarray(arr[a:b])

    def chunk_bytes_for(self, key: str, record: dict[str, Any], store) -> memoryview:
        """The bytes a manifest checksum covers: the shard's rows of dataset ``key``."""
        start, stop = record["slots"]
        if key.startswith("/layers/"):
            T = store.layer(key.split("/")[2]).tokens_per_image
            start, stop = start * T, stop * T
        return memoryview(np.ascontiguousarray(self.file[key][start:stop])).cast("B")
