"""The Zarr form of the store, read side (cache_layout.md section 2): metadata, records and raw chunk files.

Raw (uncompressed) chunks are read straight from their files; archive-mode chunks go through zarr.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visionsae.errors import StoreError
from visionsae.store.layout import shard_record_name, storage_dtype

if TYPE_CHECKING:
    from visionsae.store.reader import LayerInfo, Store

_SMALL_DTYPES = {"int64": "<i8", "uint8": "u1", "float64": "<f8"}  # image arrays and layer means


class ZarrSource:
    def __init__(self, path: Path):
        self.path = path
        meta = self._json(path / "zarr.json", what="store")
        self._attrs = meta.get("attributes", {}).get("visionsae")
        if self._attrs is None:
            raise StoreError(f"{path} is a directory but not a visionsae activation store (no zarr.json with "
                             "visionsae attributes): create one with sae-extract")

    def _json(self, file: Path, what: str) -> dict[str, Any]:
        try:
            return json.loads(file.read_text())
        except FileNotFoundError:
            raise StoreError(f"{self.path} is not a visionsae activation store (no {file.relative_to(self.path)}): "
                             "create one with sae-extract") from None
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"{file} is not valid JSON: the {what} metadata is damaged; re-extract with --overwrite") from None

    def root_attrs(self) -> dict[str, Any]:
        return self._attrs

    def layer_attrs(self, name: str) -> dict[str, Any]:
        return self._json(self.path / "layers" / name / "zarr.json", "layer")["attributes"]["visionsae"]

    @functools.lru_cache(maxsize=None)
    def _array_meta(self, name: str) -> dict[str, Any]:
        return self._json(self.path / name / "zarr.json", "array")

    def small_array(self, name: str, n_chunks: int) -> np.ndarray:
        """A whole one-dimensional array. Zarr reads a missing chunk as fill values (zeros: every image
        'unreadable', every label 0), so each chunk file must exist. Raw chunks are read directly (one
        small read per shard, far cheaper than zarr's per-chunk machinery at thousands of shards)."""
        meta = self._array_meta(name)
        files = [os.path.join(self.path, name, "c", str(c)) for c in range(n_chunks)]
        for c, f in enumerate(files):
            if not os.path.exists(f):
                raise StoreError(f"{self.path} is missing the chunk file {name}/c/{c}: the store is damaged; "
                                 + (f"delete manifest record {shard_record_name(c)} and rerun sae-extract --resume"
                                    if name.startswith("images/") else "re-extract it"))
        if self._raw(meta) and meta.get("data_type") in _SMALL_DTYPES:
            dtype = np.dtype(_SMALL_DTYPES[meta["data_type"]])
            parts = [np.fromfile(f, dtype=dtype) for f in files]
            out = np.concatenate(parts) if len(parts) > 1 else parts[0]
            return out[: int(meta["shape"][0])]
        import zarr
        return zarr.open_array(str(self.path / name), mode="r")[...]

    @staticmethod
    def image_key(name: str, shard: int) -> str:
        return f"images/{name}/c/{shard}"

    @staticmethod
    def acts_key(layer: str, shard: int) -> str:
        return f"layers/{layer}/acts/c/{shard}/0"

    def _acts_meta(self, info: "LayerInfo", ips: int) -> dict[str, Any]:
        name = f"layers/{info.name}/acts"
        meta = self._array_meta(name)
        chunk_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        if chunk_rows != ips * info.tokens_per_image:
            raise StoreError(f"{self.path}: {name} has chunks of {chunk_rows} rows, but cache_layout.md requires "
                             f"images_per_shard x tokens_per_image = {ips * info.tokens_per_image}")
        return meta

    def read_acts_into(self, info: "LayerInfo", shard: int, a: int, b: int, ips: int, out: np.ndarray):
        """Fill out[:b - a] with the shard's rows; the bytes the checksum covers (None: no chunk file)."""
        if not self._raw(self._acts_meta(info, ips)):  # archive mode: zarr decodes, the checksum is over the file
            out[: b - a] = self.shard_acts(info, shard, a, b, ips)
            return self.chunk_bytes_for(self.acts_key(info.name, shard), {}, None)
        chunk = memoryview(out).cast("B")[: ips * info.tokens_per_image * info.d * out.itemsize]
        try:
            with open(self.path / self.acts_key(info.name, shard), "rb", buffering=0) as f:
                n = f.readinto(chunk)
                extra = f.read(1)  # a longer file fails its size check below
        except FileNotFoundError:
            return None
        return chunk[:n] if not extra else bytes(chunk[:n]) + extra

    def records(self, n_shards: int | None = None) -> dict[int, dict[str, Any]]:
        """Every parseable record; with ``n_shards``, only the expected names are opened (no directory scan)."""
        out = {}
        manifest = self.path / "manifest"
        if n_shards is None:
            files = [(int(f.parent.name.split("-")[1]), f) for f in sorted(manifest.glob("shard-*/zarr.json"))
                     if f.parent.name.split("-")[1].isdigit()] if manifest.is_dir() else []
        else:
            files = [(s, os.path.join(manifest, shard_record_name(s), "zarr.json")) for s in range(n_shards)]
        for s, f in files:
            try:
                with open(f, "rb") as fh:
                    out[s] = json.loads(fh.read())["attributes"]["visionsae"]
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError):
                continue  # a damaged record counts as missing: the shard is redone on resume
        return out

    def _raw(self, meta: dict[str, Any]) -> bool:
        codecs = meta.get("codecs", [])
        return (len(codecs) == 1 and codecs[0]["name"] == "bytes"
                and codecs[0].get("configuration", {}).get("endian", "little") == "little"
                and meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") == "/")

    def shard_acts(self, info: "LayerInfo", shard: int, a: int, b: int, ips: int) -> np.ndarray:
        name = f"layers/{info.name}/acts"
        meta = self._acts_meta(info, ips)
        chunk_rows = ips * info.tokens_per_image
        dtype = storage_dtype(info.dtype)
        if self._raw(meta):
            file = self.path / name / "c" / str(shard) / "0"
            try:
                return np.memmap(file, dtype=dtype, mode="r", shape=(chunk_rows, info.d))[: b - a]
            except FileNotFoundError:
                raise StoreError(f"{self.path} is missing the chunk file {file.relative_to(self.path)}: "
                                 "re-extract that shard with --resume") from None
            except ValueError:
                raise StoreError(f"chunk file {file} is shorter than the spec's {chunk_rows} x {info.d} values: "
                                 "the store is corrupt; re-extract that shard") from None
        import zarr
        return np.asarray(zarr.open_array(str(self.path / name), mode="r")[a:b])

    def chunk_bytes_for(self, key: str, record: dict[str, Any], store: "Store | None") -> bytes | None:
        try:
            return (self.path / key).read_bytes()
        except FileNotFoundError:
            return None
