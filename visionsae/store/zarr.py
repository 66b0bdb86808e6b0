"""The Zarr form of the store (cache_layout.md section 2), both sides: metadata, records and raw chunk files.

Writing: the skeleton is laid out under a temporary name and renamed into place; each chunk file is
written by this module itself (temporary name, fsync, rename) because the spec fixes its bytes, and
zarr writes only the metadata (and the chunks of compressed archive mode). Reading: raw (uncompressed)
chunks are read straight from their files; archive-mode chunks go through zarr.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from visionsae import faults
from visionsae.atomic import fsync_dir
from visionsae.errors import StoreError
from visionsae.store.consolidate import DIMENSION_NAMES, consolidated_metadata
from visionsae.store.layout import StoreSpec, crc32_of, shard_record_name, storage_dtype, write_store_file

if TYPE_CHECKING:
    from visionsae.store.reader import LayerInfo

FORMAT = "zarr"
_SMALL_DTYPES = {"int64": "<i8", "uint8": "u1", "float64": "<f8"}  # image arrays and layer means


def read_json(file: Path, store: Path, what: str = "store") -> dict[str, Any]:
    """One metadata file of the store at ``store``, or a one-line StoreError that says which and why."""
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise StoreError(f"{store} is not a visionsae activation store (no {file.relative_to(store)}): "
                         "create one with sae-extract") from None
    except (ValueError, UnicodeDecodeError):
        raise StoreError(f"{file} is not valid JSON: the {what} metadata is damaged; re-extract with --overwrite") from None


def read_records(path: Path, n_shards: int | None = None) -> dict[int, dict[str, Any]]:
    """Every parseable record; with ``n_shards``, only the expected names are opened (no directory scan)."""
    out = {}
    manifest = path / "manifest"
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


def image_key(name: str, shard: int) -> str:
    """The chunk file of shard ``shard`` of image array ``name`` (cache_layout.md section 2): writer and reader."""
    return f"images/{name}/c/{shard}"


def acts_key(layer: str, shard: int) -> str:
    return f"layers/{layer}/acts/c/{shard}/0"


def is_store(path: Path) -> bool:
    try:
        return "visionsae" in json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


# --- writing -------------------------------------------------------------------------------------
def create(path: Path, spec: StoreSpec) -> "ZarrChunkWriter":
    """Lay the skeleton out under a temporary name, then rename it into place: a path that exists is a
    whole store, never the first few of its metadata files."""
    import zarr
    codecs = {"compressors": zarr.codecs.ZstdCodec(level=3) if spec.compressed else None, "filters": None}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        root = zarr.open_group(str(tmp), mode="w-", attributes={"visionsae": spec.root_attrs()})
        for name, dtype in (("index", "int64"), ("label", "int64"), ("valid", "uint8")):
            root.create_array(f"images/{name}", shape=(spec.n_images,), chunks=(spec.images_per_shard,),
                              dtype=dtype, fill_value=0, dimension_names=DIMENSION_NAMES[name], **codecs)
        layers = root.create_group("layers")
        for layer in spec.layers:
            g = layers.create_group(layer.name, attributes={"visionsae": layer.attrs(spec.dtype)})
            T = layer.tokens_per_image
            g.create_array("acts", shape=(spec.n_images * T, layer.d),
                           chunks=(spec.images_per_shard * T, layer.d),
                           dtype=storage_dtype(spec.dtype).newbyteorder("="), fill_value=0,
                           dimension_names=DIMENSION_NAMES["acts"], **codecs)
            g.create_array("mean", shape=(layer.d,), chunks=(layer.d,), dtype="float64", fill_value=0,
                           compressors=None, filters=None, dimension_names=DIMENSION_NAMES["mean"])
        root.create_group("manifest")
        for meta in sorted(tmp.rglob("zarr.json")):
            with open(meta, "rb+") as f:
                faults.fsync(f.fileno(), meta)
        faults.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"cannot create the store at {path}: {err.strerror or err}") from None
    return ZarrChunkWriter(path, spec)


def reopen(path: Path, spec: StoreSpec, check_attrs: Callable[[dict[str, Any]], None]) -> "ZarrChunkWriter":
    meta = read_json(path / "zarr.json", path)
    attrs = meta.get("attributes", {}).get("visionsae")
    if not isinstance(attrs, dict):
        raise StoreError(f"{path} is not a visionsae activation store: refusing to write into it")
    check_attrs(attrs)
    writer = ZarrChunkWriter(path, spec)
    writer.check_layout()
    return writer


class ZarrChunkWriter:
    """Writes chunk files and records of one Zarr store (any number of processes, one shard each at a time)."""

    def __init__(self, path: Path, spec: StoreSpec):
        self.path, self.spec = path, spec

    def check_layout(self) -> None:
        """Every metadata file of section 2 is there and parses (a store laid out by an older visionsae
        and killed half-way is not)."""
        for name in self._node_names():
            f = self.path / name / "zarr.json"
            try:
                json.loads(f.read_text())
            except (OSError, ValueError):
                raise StoreError(f"{self.path} is an unfinished store skeleton ({name}/zarr.json is missing or "
                                 "damaged): rerun sae-extract with --overwrite") from None

    def _node_names(self) -> list[str]:
        """Every group and array of section 2 below the root, the manifest's records excepted."""
        names = ["images", "layers", "manifest"] + [f"images/{a}" for a in ("index", "label", "valid")]
        for layer in self.spec.layers:
            names += [f"layers/{layer.name}", f"layers/{layer.name}/acts", f"layers/{layer.name}/mean"]
        return names

    def write_chunks(self, shard, index, label, valid_u8, stored):
        arrays = [(f"images/{a}", image_key(a, shard), data)
                  for a, data in (("index", index), ("label", label), ("valid", valid_u8))]
        arrays += [(f"layers/{la.name}/acts", acts_key(la.name, shard), stored[la.name]) for la in self.spec.layers]
        chunks = {}
        for name, key, data in arrays:
            if self.spec.compressed:
                blob = self._write_with_zarr(name, shard, data, key)
            else:
                chunk_rows = data.shape[0] * self.spec.images_per_shard // len(index)
                if data.shape[0] < chunk_rows:  # the last chunk is stored at full size (Zarr's rule)
                    pad = np.zeros((chunk_rows - data.shape[0],) + data.shape[1:], dtype=data.dtype)
                    data = np.concatenate([data, pad])
                blob = memoryview(np.ascontiguousarray(data)).cast("B")
                write_store_file(self.path / key, blob)
            chunks[key] = {"nbytes": len(blob), "crc32": crc32_of(blob)}
        return chunks

    def _write_with_zarr(self, name: str, shard: int, data: np.ndarray, key: str) -> bytes:
        """Archive mode: zarr encodes the chunk; the record (written after) still makes it count."""
        import zarr
        arr = zarr.open_array(str(self.path / name), mode="r+")
        start = shard * arr.chunks[0]
        arr[start:start + data.shape[0]] = data
        return (self.path / key).read_bytes()

    def write_record(self, shard, record):
        meta = {"attributes": {"visionsae": record}, "zarr_format": 3, "consolidated_metadata": None,
                "node_type": "group"}
        write_store_file(self.path / "manifest" / shard_record_name(shard) / "zarr.json",
                     json.dumps(meta, indent=2).encode())

    def records(self):
        return read_records(self.path, self.spec.n_shards)

    def write_final(self, layer_attrs, means, n_skipped):
        for name, attrs in layer_attrs.items():
            mean_bytes = np.ascontiguousarray(means[name], dtype="<f8")
            write_store_file(self.path / "layers" / name / "mean" / "c" / "0", memoryview(mean_bytes).cast("B"))
            layer_json = self.path / "layers" / name / "zarr.json"
            meta = read_json(layer_json, self.path, "layer")
            meta.setdefault("attributes", {})["visionsae"] = attrs
            write_store_file(layer_json, json.dumps(meta, indent=2).encode())
        # One write sets `complete` and the consolidated metadata (of the final layer attributes) together.
        meta = read_json(self.path / "zarr.json", self.path)
        root = meta["attributes"]["visionsae"]
        meta["attributes"]["visionsae"] = {**root, "complete": True, "n_skipped": n_skipped}
        meta["consolidated_metadata"] = consolidated_metadata(self.path, self._node_names())
        write_store_file(self.path / "zarr.json", json.dumps(meta, indent=2).encode())

    def close(self) -> None:
        pass


# --- reading -------------------------------------------------------------------------------------
class ZarrReader:
    format = FORMAT

    def __init__(self, path: Path):
        self.path = path
        meta = read_json(path / "zarr.json", path)
        self._attrs = meta.get("attributes", {}).get("visionsae")
        if self._attrs is None:
            raise StoreError(f"{path} is a directory but not a visionsae activation store (no zarr.json with "
                             "visionsae attributes): create one with sae-extract")

    def root_attrs(self) -> dict[str, Any]:
        return self._attrs

    def layer_attrs(self, name: str) -> dict[str, Any]:
        return read_json(self.path / "layers" / name / "zarr.json", self.path, "layer")["attributes"]["visionsae"]

    @functools.lru_cache(maxsize=None)
    def _array_meta(self, name: str) -> dict[str, Any]:
        return read_json(self.path / name / "zarr.json", self.path, "array")

    def small_array(self, name: str) -> np.ndarray:
        """A whole one-dimensional array. Zarr reads a missing chunk as fill values (zeros: every image
        'unreadable', every label 0), so each chunk file must exist. Raw chunks are read directly (one
        small read per shard, far cheaper than zarr's per-chunk machinery at thousands of shards)."""
        meta = self._array_meta(name)
        n_chunks = -(-int(meta["shape"][0]) // int(meta["chunk_grid"]["configuration"]["chunk_shape"][0]))
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

    image_key = staticmethod(image_key)
    acts_key = staticmethod(acts_key)

    def _acts_meta(self, info: "LayerInfo", ips: int) -> dict[str, Any]:
        name = f"layers/{info.name}/acts"
        meta = self._array_meta(name)
        chunk_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        if chunk_rows != ips * info.tokens_per_image:
            raise StoreError(f"{self.path}: {name} has chunks of {chunk_rows} rows, but cache_layout.md requires "
                             f"images_per_shard x tokens_per_image = {ips * info.tokens_per_image}")
        return meta

    def read_acts_into(self, info: "LayerInfo", shard: int, a: int, b: int, ips: int, out: np.ndarray):
        if not self._raw(self._acts_meta(info, ips)):  # archive mode: zarr decodes, the checksum is over the file
            out[: b - a] = self.shard_acts(info, shard, a, b, ips)
            return self.chunk_bytes(self.acts_key(info.name, shard), a, b)
        chunk = memoryview(out).cast("B")[: ips * info.tokens_per_image * info.d * out.itemsize]
        try:
            with open(self.path / self.acts_key(info.name, shard), "rb", buffering=0) as f:
                n = f.readinto(chunk)
                extra = f.read(1)  # a longer file fails its size check below
        except FileNotFoundError:
            return None
        return chunk[:n] if not extra else bytes(chunk[:n]) + extra

    def records(self, n_shards: int | None = None) -> dict[int, dict[str, Any]]:
        return read_records(self.path, n_shards)

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

    def chunk_bytes(self, key: str, start: int, stop: int) -> bytes | None:
        # A chunk file holds exactly the bytes its checksum covers (padding of a short last chunk included).
        try:
            return (self.path / key).read_bytes()
        except FileNotFoundError:
            return None


open_reader = ZarrReader  # the Backend entry point of the read side
