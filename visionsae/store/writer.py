"""Writing an activation store shard by shard, crash-safely (cache_layout.md sections 2, 3, 6, 8).

``StoreWriter.create`` lays out the store (or reopens it to resume); ``write_shard`` writes one
shard's chunk files and then its manifest record; ``finalize`` aggregates the statistics and marks
the store complete. The Zarr backend writes each chunk file itself (temporary name, fsync, rename)
because the spec fixes their bytes; zarr writes the metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from visionsae import faults
from visionsae.errors import StoreError
from visionsae.locks import OutputLock
from visionsae.store import hdf5_backend
from visionsae.store.consolidate import DIMENSION_NAMES, consolidated_metadata
from visionsae.store.layout import (HDF5_SIGNATURE, LayerSpec, StoreSpec, atomic_write, crc32_of, fsync_dir,
                                    shard_record_name, storage_dtype, to_storage)

MODES = ("new", "overwrite", "resume", "join")


class StoreWriter:
    """Writes one store. Use ``StoreWriter.create(path, spec, mode)``."""

    def __init__(self, path: Path, spec: StoreSpec):
        self.path, self.spec = path, spec
        self.n_shards = spec.n_shards

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, spec: StoreSpec, mode: str = "new") -> "StoreWriter":
        spec.validate()
        if mode not in MODES:
            raise StoreError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the folder of {path}: {err.strerror or err}; choose another --out") from None
        if not path.parent.is_dir():
            raise StoreError(f"{path.parent} is not a folder: choose another --out")
        if mode == "join":  # another rank created the store and holds its lock
            if not path.exists():
                raise StoreError(f"{path} does not exist: the first rank must create it before others join")
            spec = _detect_format(path, spec)
            return _backend(spec)._reopen(path, spec)
        lock = OutputLock(path, "sae-extract").acquire()
        try:
            writer = cls._create_locked(path, spec, mode)
        except BaseException:
            lock.release()
            raise
        writer._lock = lock
        return writer

    @classmethod
    def _create_locked(cls, path: Path, spec: StoreSpec, mode: str) -> "StoreWriter":
        # Skeletons of creations killed before their rename: litter, as we hold the lock.
        for tmp in path.parent.glob(f"{glob_escape(path.name)}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if mode == "resume":
            if not path.exists():  # nothing to resume: start it, as a user would expect
                return _backend(spec)._new(path, spec)
            spec = _detect_format(path, spec)
            writer = _backend(spec)._reopen(path, spec)
            if path.is_dir():
                # A process killed mid-chunk leaves <name>.tmp-<pid> (never a record for it): the shard
                # is rewritten, so the leftover is litter. Not on "join": other ranks may be writing.
                for tmp in path.rglob("*.tmp-*"):
                    tmp.unlink(missing_ok=True)
            return writer
        if path.exists() or path.is_symlink():
            if mode == "new":
                if not _is_store(path):
                    raise StoreError(f"{path} already exists and is not a visionsae activation store: choose "
                                     "another --out")
                raise StoreError(f"{path} already exists: pass --resume to continue it or --overwrite to replace it")
            _remove_store(path)
        return _backend(spec)._new(path, spec)

    def shard_slots(self, shard: int) -> tuple[int, int]:
        start = shard * self.spec.images_per_shard
        return start, min(start + self.spec.images_per_shard, self.spec.n_images)

    def _check_resume_attrs(self, existing: Mapping[str, Any]) -> None:
        want = self.spec.root_attrs()
        for key in want:
            if key in ("complete", "n_skipped"):
                continue
            if json.dumps(existing.get(key), sort_keys=True) != json.dumps(want[key], sort_keys=True):
                raise StoreError(f"cannot resume {self.path}: its '{key}' differs from this run's "
                                 f"({_short(existing.get(key))} vs {_short(want[key])}); rerun with the "
                                 "original settings or pass --overwrite")

    # --- writing ------------------------------------------------------------------------------
    def write_shard(self, shard: int, *, index: np.ndarray, label: np.ndarray, valid: np.ndarray,
                    acts: Mapping[str, Any]) -> None:
        """Write shard ``shard`` (all its slots, every layer), then mark it complete."""
        if not 0 <= shard < self.n_shards:
            raise StoreError(f"shard {shard} is out of range 0..{self.n_shards - 1}")
        start, stop = self.shard_slots(shard)
        n = stop - start
        index, label = np.asarray(index, dtype="<i8"), np.asarray(label, dtype="<i8")
        valid = np.asarray(valid, dtype=bool)
        if index.shape != (n,) or label.shape != (n,) or valid.shape != (n,):
            raise ValueError(f"shard {shard} holds {n} slots; got index/label/valid of shapes "
                             f"{index.shape}/{label.shape}/{valid.shape}")
        missing = {layer.name for layer in self.spec.layers} - set(acts)
        if missing:
            raise ValueError(f"shard {shard}: no activations for layers {sorted(missing)}")
        stored: dict[str, np.ndarray] = {}
        stats: dict[str, Any] = {}
        for layer in self.spec.layers:
            rows_LD = to_storage(acts[layer.name], self.spec.dtype)
            if rows_LD.shape != (n * layer.tokens_per_image, layer.d):
                raise ValueError(f"layer {layer.name}, shard {shard}: expected activations of shape "
                                 f"{(n * layer.tokens_per_image, layer.d)}, got {rows_LD.shape}")
            row_valid = np.repeat(valid, layer.tokens_per_image)
            if not row_valid.all():  # the spec: rows of unreadable images are zeros
                rows_LD = rows_LD.copy()
                rows_LD[~row_valid] = 0
            stored[layer.name] = rows_LD
            stats[layer.name] = _shard_stats(rows_LD[row_valid], self.spec.dtype)
        chunks = self._write_chunks(shard, index, label, valid.astype(np.uint8), stored)
        record = {"shard": shard, "slots": [start, stop], "n_valid": int(valid.sum()),
                  "skipped": [int(i) for i in index[~valid]], "chunks": chunks, "stats": stats}
        self._write_record(shard, record)

    def done_shards(self) -> set[int]:
        return set(self._records())

    def finalize(self) -> None:
        """Aggregate per-shard statistics in shard order and mark the store complete."""
        records = self._records()
        missing = [s for s in range(self.n_shards) if s not in records]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise StoreError(f"{self.path} is missing {len(missing)} of {self.n_shards} shards ({shown}): "
                             "rerun sae-extract with --resume to write them")
        layer_attrs, means = {}, {}
        for layer in self.spec.layers:
            count, total, sq = 0, np.zeros(layer.d, dtype=np.float64), 0.0
            for s in range(self.n_shards):
                st = records[s]["stats"][layer.name]
                count += int(st["count"])
                total += np.asarray(st["sum"], dtype=np.float64)
                sq += float(st["sum_sq_norm"])
            means[layer.name] = total / max(count, 1)
            layer_attrs[layer.name] = {**layer.attrs(self.spec.dtype), "count": count,
                                       "mean_sq_norm": sq / max(count, 1)}
        n_skipped = sum(len(records[s]["skipped"]) for s in range(self.n_shards))
        self._check_layout()  # `complete` is never set on a store that does not open
        self._write_final(layer_attrs, means, n_skipped)

    # --- backend hooks ----------------------------------------------------------------------
    def _write_chunks(self, shard, index, label, valid_u8, stored) -> dict[str, dict[str, int]]:
        raise NotImplementedError

    def _write_record(self, shard: int, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def _records(self) -> dict[int, dict[str, Any]]:
        raise NotImplementedError

    def _write_final(self, layer_attrs, means, n_skipped) -> None:
        raise NotImplementedError

    def _check_layout(self) -> None:
        pass

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()


class ZarrWriter(StoreWriter):
    @classmethod
    def _new(cls, path: Path, spec: StoreSpec) -> "ZarrWriter":
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
        return cls(path, spec)

    @classmethod
    def _reopen(cls, path: Path, spec: StoreSpec) -> "ZarrWriter":
        meta = _read_json(path / "zarr.json", path)
        attrs = meta.get("attributes", {}).get("visionsae")
        if not isinstance(attrs, dict):
            raise StoreError(f"{path} is not a visionsae activation store: refusing to write into it")
        writer = cls(path, spec)
        writer._check_resume_attrs(attrs)
        writer._check_layout()
        return writer

    def _check_layout(self) -> None:
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

    def _write_chunks(self, shard, index, label, valid_u8, stored):
        arrays = {"images/index": index, "images/label": label, "images/valid": valid_u8}
        arrays.update({f"layers/{la.name}/acts": stored[la.name] for la in self.spec.layers})
        chunks = {}
        for name, data in arrays.items():
            key = f"{name}/c/{shard}" + ("/0" if data.ndim == 2 else "")
            if self.spec.compressed:
                blob = self._write_with_zarr(name, shard, data, key)
            else:
                chunk_rows = data.shape[0] * self.spec.images_per_shard // len(index)
                if data.shape[0] < chunk_rows:  # the last chunk is stored at full size (Zarr's rule)
                    pad = np.zeros((chunk_rows - data.shape[0],) + data.shape[1:], dtype=data.dtype)
                    data = np.concatenate([data, pad])
                blob = memoryview(np.ascontiguousarray(data)).cast("B")
                atomic_write(self.path / key, blob)
            chunks[key] = {"nbytes": len(blob), "crc32": crc32_of(blob)}
        return chunks

    def _write_with_zarr(self, name: str, shard: int, data: np.ndarray, key: str) -> bytes:
        """Archive mode: zarr encodes the chunk; the record (written after) still makes it count."""
        import zarr
        arr = zarr.open_array(str(self.path / name), mode="r+")
        start = shard * arr.chunks[0]
        arr[start:start + data.shape[0]] = data
        return (self.path / key).read_bytes()

    def _write_record(self, shard, record):
        meta = {"attributes": {"visionsae": record}, "zarr_format": 3, "consolidated_metadata": None,
                "node_type": "group"}
        atomic_write(self.path / "manifest" / shard_record_name(shard) / "zarr.json",
                     json.dumps(meta, indent=2).encode())

    def _records(self):
        out = {}
        manifest = self.path / "manifest"
        for s in range(self.n_shards):
            f = manifest / shard_record_name(s) / "zarr.json"
            if f.exists():
                try:
                    out[s] = json.loads(f.read_text())["attributes"]["visionsae"]
                except (ValueError, KeyError):
                    continue  # a damaged record counts as not written: the shard is redone on resume
        return out

    def _write_final(self, layer_attrs, means, n_skipped):
        for name, attrs in layer_attrs.items():
            mean_bytes = np.ascontiguousarray(means[name], dtype="<f8")
            atomic_write(self.path / "layers" / name / "mean" / "c" / "0", memoryview(mean_bytes).cast("B"))
            _update_attrs(self.path / "layers" / name / "zarr.json", attrs)
        # One write sets `complete` and the consolidated metadata (of the final layer attributes) together.
        meta = _read_json(self.path / "zarr.json", self.path)
        root = meta["attributes"]["visionsae"]
        meta["attributes"]["visionsae"] = {**root, "complete": True, "n_skipped": n_skipped}
        meta["consolidated_metadata"] = consolidated_metadata(self.path, self._node_names())
        atomic_write(self.path / "zarr.json", json.dumps(meta, indent=2).encode())


class H5Writer(hdf5_backend.H5WriterMixin, StoreWriter):
    """HDF5 backend (cache_layout.md section 3)."""


def _shard_stats(rows_VD: np.ndarray, dtype: str) -> dict[str, Any]:
    """float64 column sums and sum of squared norms of the stored values, in blocks to bound memory."""
    from visionsae.store.layout import to_float32
    total = np.zeros(rows_VD.shape[1], dtype=np.float64)
    sq = 0.0
    for i in range(0, rows_VD.shape[0], 16384):
        block = to_float32(rows_VD[i:i + 16384], dtype).astype(np.float64)
        total += block.sum(axis=0)
        sq += float(np.einsum("ij,ij->", block, block))
    return {"count": int(rows_VD.shape[0]), "sum": [float(v) for v in total], "sum_sq_norm": sq}


def _backend(spec: StoreSpec) -> type[StoreWriter]:
    return ZarrWriter if spec.format == "zarr" else H5Writer


def _detect_format(path: Path, spec: StoreSpec) -> StoreSpec:
    """An existing store's format is what it is on disk, whatever --format says (resume without --format hdf5)."""
    if path.is_dir():
        fmt = "zarr"
    else:
        with open(path, "rb") as f:
            head = f.read(8)
        if head != HDF5_SIGNATURE:
            raise StoreError(f"{path} is a file but not an HDF5 activation store: refusing to write into it; "
                             "choose another --out")
        fmt = "hdf5"
    return spec if fmt == spec.format else dataclasses.replace(spec, format=fmt, compressed=False)


def _read_json(file: Path, store: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise StoreError(f"{store} is not a visionsae activation store (no {file.name}): "
                         "create it with sae-extract") from None
    except ValueError:
        raise StoreError(f"{file} is not valid JSON: the store metadata is damaged; re-extract with --overwrite") from None


def _update_attrs(zarr_json: Path, visionsae_attrs: dict[str, Any]) -> None:
    meta = json.loads(zarr_json.read_text())
    meta.setdefault("attributes", {})["visionsae"] = visionsae_attrs
    atomic_write(zarr_json, json.dumps(meta, indent=2).encode())


def _is_store(path: Path) -> bool:
    if path.is_dir():
        try:
            return "visionsae" in json.loads((path / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError, AttributeError):
            return False
    if path.is_file():
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE and hdf5_backend.is_visionsae_h5(path)
    return False


def _remove_store(path: Path) -> None:
    """--overwrite removes only something that is recognisably a visionsae store."""
    if path.is_symlink():
        raise StoreError(f"{path} is a symbolic link: --overwrite does not follow it; pass the store's real path "
                         f"({os.path.realpath(path)}) or remove the link")
    if not _is_store(path):
        raise StoreError(f"{path} exists and is not a visionsae activation store: refusing to overwrite it; "
                         "choose another --out")
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def layer_specs_from_arrays(acts: Mapping[str, np.ndarray], n_images: int, tokens_per_image: int
                            ) -> tuple[LayerSpec, ...]:
    specs = []
    for name, arr in acts.items():
        if arr.ndim != 2 or arr.shape[0] != n_images * tokens_per_image:
            raise StoreError(f"layer {name}: expected a [n_images * tokens_per_image, d] array "
                             f"({n_images} x {tokens_per_image} rows), got shape {arr.shape}")
        kind = "embedding" if tokens_per_image == 1 else "residual"
        specs.append(LayerSpec(name, name, kind, int(arr.shape[1]), tokens_per_image,
                               "embedding" if tokens_per_image == 1 else "all"))
    return tuple(specs)
