"""Reading an activation store (Zarr or HDF5) through one API; activations are memory-mapped.

``open_store(path)`` checks that the path is a complete store of a known format version and
returns a ``Store``. Shards are read straight from their chunk files with ``np.memmap`` (no
decoding) unless the store was written in compressed archive mode, where zarr decodes them.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from visionsae.errors import StoreError
from visionsae.store.hdf5_backend import H5Source
from visionsae.store.layout import (FORMAT, FORMAT_VERSION, HDF5_SIGNATURE, crc32_of, shard_record_name,
                                    layer_fingerprint, storage_dtype, store_fingerprint,
                                    to_float32)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    name: str
    source: str
    kind: str
    d: int
    tokens_per_image: int
    token_kind: str
    dtype: str
    count: int
    mean: np.ndarray  # float64 [d]
    mean_sq_norm: float


def open_store(path: str | Path) -> "Store":
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no activation store at {path}: create one with `sae-extract --out {path}`")
    if path.is_dir():
        source: Any = _ZarrSource(path)
    else:
        with open(path, "rb") as f:
            head = f.read(8)
        if head != HDF5_SIGNATURE:
            raise StoreError(f"{path} is not an activation store (neither a Zarr directory nor an HDF5 file)")
        source = H5Source(path)
    return Store(path, source)


class Store:
    def __init__(self, path: Path, source: Any):
        self.path, self._src = path, source
        self.format = "hdf5" if isinstance(source, H5Source) else "zarr"
        attrs = source.root_attrs()
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is not a visionsae activation store (no '{FORMAT}' attributes)")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path} has store format version {attrs.get('format_version')}; this visionsae "
                             f"reads version {FORMAT_VERSION}: re-extract it or upgrade visionsae")
        if not attrs.get("complete"):
            done = len(source.records())
            raise StoreError(f"{path} is incomplete ({done} of {attrs.get('n_shards')} shards written): finish it "
                             "with the same sae-extract command plus --resume")
        self.attrs = attrs
        self.n_images = int(attrs["n_images"])
        self.images_per_shard = int(attrs["images_per_shard"])
        self.n_shards = int(attrs["n_shards"])
        self.dtype = attrs["dtype"]
        self.layer_names: list[str] = list(attrs["layers"])
        self._layers = {name: self._load_layer(name) for name in self.layer_names}
        self._verified: set[int] = set()
        self._maps: dict[tuple[str, int], np.ndarray] = {}

    # --- metadata -----------------------------------------------------------------------------
    @property
    def backbone(self) -> dict[str, Any]:
        return self.attrs["backbone"]

    @property
    def dataset(self) -> dict[str, Any]:
        return self.attrs["dataset"]

    @property
    def classes(self) -> list[str]:
        return list(self.dataset.get("classes") or [])

    @cached_property
    def fingerprint(self) -> str:
        return store_fingerprint(self.attrs, [self._src.layer_attrs(n) for n in self.layer_names])

    def layer_fingerprint(self, name: str) -> str | None:
        """Identity of the backbone, preprocessing, tokens and layer that computed ``name``'s rows (section 9)."""
        self.layer(name)  # unknown names fail with the usual message
        return layer_fingerprint(self.attrs, self._src.layer_attrs(name))

    @cached_property
    def image_index(self) -> np.ndarray:
        return self._src.small_array("images/index").astype(np.int64)

    @cached_property
    def labels(self) -> np.ndarray:
        return self._src.small_array("images/label").astype(np.int64)

    @cached_property
    def valid(self) -> np.ndarray:
        return self._src.small_array("images/valid").astype(bool)

    def layer(self, name: str | None = None) -> LayerInfo:
        if name is None:
            if len(self.layer_names) != 1:
                raise StoreError(f"{self.path} holds several layers ({', '.join(self.layer_names)}): "
                                 "choose one with --layer")
            name = self.layer_names[0]
        if name not in self._layers:
            raise StoreError(f"unknown layer '{name}' in {self.path}: choose one of {', '.join(self.layer_names)}")
        return self._layers[name]

    def _load_layer(self, name: str) -> LayerInfo:
        a = self._src.layer_attrs(name)
        try:
            mean = self._src.small_array(f"layers/{name}/mean").astype(np.float64)
            return LayerInfo(name=a["name"], source=a["source"], kind=a["kind"], d=int(a["d"]),
                             tokens_per_image=int(a["tokens_per_image"]), token_kind=a["token_kind"],
                             dtype=a["dtype"], count=int(a["count"]), mean=mean,
                             mean_sq_norm=float(a["mean_sq_norm"]))
        except KeyError as err:
            raise StoreError(f"layer '{name}' of {self.path} lacks attribute {err}: the store is damaged or "
                             "was not finished; re-extract it") from None

    # --- geometry -----------------------------------------------------------------------------
    def shard_slots(self, shard: int) -> tuple[int, int]:
        start = shard * self.images_per_shard
        return start, min(start + self.images_per_shard, self.n_images)

    def shard_rows(self, layer: str, shard: int) -> tuple[int, int]:
        T = self.layer(layer).tokens_per_image
        a, b = self.shard_slots(shard)
        return a * T, b * T

    # --- data ---------------------------------------------------------------------------------
    def shard_array(self, layer: str, shard: int) -> np.ndarray:
        """Rows of one shard in the stored dtype (a memory map where the format allows it)."""
        info = self.layer(layer)
        if not 0 <= shard < self.n_shards:
            raise StoreError(f"shard {shard} out of range 0..{self.n_shards - 1}")
        key = (info.name, shard)
        if key not in self._maps:
            a, b = self.shard_rows(info.name, shard)
            self._maps[key] = self._src.shard_acts(info, shard, a, b, self.images_per_shard)
        return self._maps[key]

    def read_rows(self, layer: str, start: int, stop: int) -> np.ndarray:
        info = self.layer(layer)
        T = info.tokens_per_image
        rows_per_shard = self.images_per_shard * T
        parts = []
        for s in range(start // rows_per_shard, -(-stop // rows_per_shard)):
            base = s * rows_per_shard
            arr = self.shard_array(info.name, s)
            parts.append(arr[max(start - base, 0):min(stop - base, arr.shape[0])])
        if not parts:
            return np.zeros((0, info.d), dtype=np.float32)
        return to_float32(np.concatenate(parts) if len(parts) > 1 else parts[0], info.dtype)

    def read_slots(self, layer: str, slots: np.ndarray) -> np.ndarray:
        """Rows of the given images, image after image in the order given: [len(slots) * T, d] float32."""
        info = self.layer(layer)
        T = info.tokens_per_image
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size and (slots.min() < 0 or slots.max() >= self.n_images):
            raise StoreError(f"image slots out of range 0..{self.n_images - 1}")
        rows = (slots[:, None] * T + np.arange(T)[None, :]).reshape(-1)
        out = np.empty((rows.size, info.d), dtype=np.float32)
        rows_per_shard = self.images_per_shard * T
        shard_of = rows // rows_per_shard
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            arr = self.shard_array(info.name, int(s))
            out[sel] = to_float32(arr[rows[sel] - s * rows_per_shard], info.dtype)
        return out

    # --- integrity ----------------------------------------------------------------------------
    def verify_shard(self, shard: int) -> None:
        if shard in self._verified:
            return
        record = self._src.records().get(shard)
        if record is None:
            raise StoreError(f"shard {shard} of {self.path} has no manifest record: re-extract it with --resume")
        for key, want in record["chunks"].items():
            data = self._src.chunk_bytes_for(key, record, self)
            if len(data) != want["nbytes"] or crc32_of(data) != want["crc32"]:
                raise StoreError(f"shard {shard} of {self.path} fails its checksum ({key}): the file is corrupt; "
                                 f"delete manifest record {shard_record_name(shard)} and rerun sae-extract --resume")
        self._verified.add(shard)

    def verify(self) -> None:
        for s in range(self.n_shards):
            self.verify_shard(s)

    # --- optional parts (cache_layout.md section 11) -------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """Readable class names, index = label: ``dataset.class_names`` where the store records them (ImageNet
        synsets), else ``dataset.classes``; empty for a store without classes."""
        return list(self.dataset.get("class_names") or self.dataset.get("classes") or [])

    def head(self):
        """The backbone's classifier head (``visionsae.store.extras.ClassifierHead``), or None."""
        from visionsae.store.extras import read_head
        return read_head(self.path)


class _ZarrSource:
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

    def _array_meta(self, name: str) -> dict[str, Any]:
        return self._json(self.path / name / "zarr.json", "array")

    def small_array(self, name: str) -> np.ndarray:
        import zarr
        return zarr.open_array(str(self.path / name), mode="r")[...]

    def records(self) -> dict[int, dict[str, Any]]:
        out = {}
        manifest = self.path / "manifest"
        for f in sorted(manifest.glob("shard-*/zarr.json")) if manifest.is_dir() else []:
            try:
                out[int(f.parent.name.split("-")[1])] = json.loads(f.read_text())["attributes"]["visionsae"]
            except (ValueError, KeyError):
                continue
        return out

    def _raw(self, meta: dict[str, Any]) -> bool:
        codecs = meta.get("codecs", [])
        return (len(codecs) == 1 and codecs[0]["name"] == "bytes"
                and codecs[0].get("configuration", {}).get("endian", "little") == "little"
                and meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") == "/")

    def shard_acts(self, info: LayerInfo, shard: int, a: int, b: int, ips: int) -> np.ndarray:
        name = f"layers/{info.name}/acts"
        meta = self._array_meta(name)
        chunk_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        if chunk_rows != ips * info.tokens_per_image:
            raise StoreError(f"{self.path}: {name} has chunks of {chunk_rows} rows, but cache_layout.md requires "
                             f"images_per_shard x tokens_per_image = {ips * info.tokens_per_image}")
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

    def chunk_bytes_for(self, key: str, record: dict[str, Any], store: Store) -> bytes:
        try:
            return (self.path / key).read_bytes()
        except FileNotFoundError:
            return b""
