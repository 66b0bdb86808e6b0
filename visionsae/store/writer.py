"""Writing an activation store shard by shard, crash-safely (cache_layout.md sections 2, 3, 6, 8).

``StoreWriter.create`` lays out the store (or reopens it to resume); ``write_shard`` writes one
shard's chunk files and then its manifest record; ``finalize`` aggregates the statistics and marks
the store complete. What is format-neutral lives here (modes, resume checks, shapes, statistics, the
record's contents); the format modules ``store.zarr`` and ``store.hdf5`` do the writing behind the
interface of ``store.backend``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from visionsae.errors import StoreError
from visionsae.locks import OutputLock
from visionsae.store import hdf5, zarr
from visionsae.store.backend import Backend, ChunkWriter
from visionsae.store.layout import LayerSpec, format_on_disk, StoreSpec, aggregate_stats, to_float32, to_storage

MODES = ("new", "overwrite", "resume", "join")


class StoreWriter:
    """Writes one store. Use ``StoreWriter.create(path, spec, mode)``."""

    def __init__(self, path: Path, spec: StoreSpec, backend: ChunkWriter):
        self.path, self.spec, self._backend = path, spec, backend
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
            return cls._reopen(path, spec)
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
                return cls(path, spec, _backend(spec.format).create(path, spec))
            spec = _detect_format(path, spec)
            writer = cls._reopen(path, spec)
            if path.is_dir():
                # A process killed mid-chunk leaves <name>.tmp-<pid> (never a record for it): the shard
                # is rewritten, so the leftover is litter. Not on "join": other ranks may be writing.
                for tmp in path.rglob("*.tmp-*"):
                    tmp.unlink(missing_ok=True)
            return writer
        if path.exists() or path.is_symlink():
            if mode == "new":
                if not is_store(path):
                    raise StoreError(f"{path} already exists and is not a visionsae activation store: choose "
                                     "another --out")
                raise StoreError(f"{path} already exists: pass --resume to continue it or --overwrite to replace it")
            _remove_store(path)
        return cls(path, spec, _backend(spec.format).create(path, spec))

    @classmethod
    def _reopen(cls, path: Path, spec: StoreSpec) -> "StoreWriter":
        check = functools.partial(_check_resume_attrs, path, spec)  # (attrs) -> None, raises on a mismatch
        return cls(path, spec, _backend(spec.format).reopen(path, spec, check))

    def shard_slots(self, shard: int) -> tuple[int, int]:
        return self.spec.shard_slots(shard)

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
            rows_RD = to_storage(acts[layer.name], self.spec.dtype)
            if rows_RD.shape != (n * layer.tokens_per_image, layer.d):
                raise ValueError(f"layer {layer.name}, shard {shard}: expected activations of shape "
                                 f"{(n * layer.tokens_per_image, layer.d)}, got {rows_RD.shape}")
            row_valid = np.repeat(valid, layer.tokens_per_image)
            if not row_valid.all():  # the spec: rows of unreadable images are zeros
                rows_RD = rows_RD.copy()
                rows_RD[~row_valid] = 0
            stored[layer.name] = rows_RD
            # every row valid (the usual case): no boolean-index copy of the whole shard
            stats[layer.name] = _shard_stats(rows_RD if row_valid.all() else rows_RD[row_valid], self.spec.dtype)
        chunks = self._backend.write_chunks(shard, index, label, valid.astype(np.uint8), stored)
        record = {"shard": shard, "slots": [start, stop], "n_valid": int(valid.sum()),
                  "skipped": [int(i) for i in index[~valid]], "chunks": chunks, "stats": stats}
        self._backend.write_record(shard, record)

    def done_shards(self) -> set[int]:
        return set(self._backend.records())

    def finalize(self) -> None:
        """Aggregate per-shard statistics in shard order and mark the store complete."""
        records = self._backend.records()
        missing = [s for s in range(self.n_shards) if s not in records]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise StoreError(f"{self.path} is missing {len(missing)} of {self.n_shards} shards ({shown}): "
                             "rerun sae-extract with --resume to write them")
        layer_attrs, means = {}, {}
        for layer in self.spec.layers:
            count, total, sq = aggregate_stats(records, layer.name, layer.d, self.n_shards)
            means[layer.name] = total / max(count, 1)
            layer_attrs[layer.name] = {**layer.attrs(self.spec.dtype), "count": count,
                                       "mean_sq_norm": sq / max(count, 1)}
        n_skipped = sum(len(records[s]["skipped"]) for s in range(self.n_shards))
        self._backend.check_layout()  # `complete` is never set on a store that does not open
        self._backend.write_final(layer_attrs, means, n_skipped)

    def close(self) -> None:
        try:
            self._backend.close()
        finally:
            lock = getattr(self, "_lock", None)
            if lock is not None:
                lock.release()


def _check_resume_attrs(path: Path, spec: StoreSpec, existing: Mapping[str, Any]) -> None:
    want = spec.root_attrs()
    for key in want:
        if key in ("complete", "n_skipped"):
            continue
        if json.dumps(existing.get(key), sort_keys=True) != json.dumps(want[key], sort_keys=True):
            raise StoreError(f"cannot resume {path}: its '{key}' differs from this run's "
                             f"({_short(existing.get(key))} vs {_short(want[key])}); rerun with the "
                             "original settings or pass --overwrite")


def _shard_stats(rows_VD: np.ndarray, dtype: str) -> dict[str, Any]:
    """float64 column sums and sum of squared norms of the stored values, in blocks to bound memory."""
    total = np.zeros(rows_VD.shape[1], dtype=np.float64)
    sq = 0.0
    for i in range(0, rows_VD.shape[0], 16384):
        block = to_float32(rows_VD[i:i + 16384], dtype).astype(np.float64)
        total += block.sum(axis=0)
        sq += float(np.einsum("ij,ij->", block, block))
    return {"count": int(rows_VD.shape[0]), "sum": [float(v) for v in total], "sum_sq_norm": sq}


def _backend(fmt: str) -> Backend:
    return zarr if fmt == "zarr" else hdf5


def _detect_format(path: Path, spec: StoreSpec) -> StoreSpec:
    """An existing store's format is what it is on disk, whatever --format says (resume without --format hdf5)."""
    fmt = format_on_disk(path)
    if fmt is None:
        raise StoreError(f"{path} is a file but not an HDF5 activation store: refusing to write into it; "
                         "choose another --out")
    return spec if fmt == spec.format else dataclasses.replace(spec, format=fmt, compressed=False)


def is_store(path: Path) -> bool:
    """Whether ``path`` is recognisably a visionsae store (either format), complete or not."""
    fmt = format_on_disk(path) if path.is_dir() or path.is_file() else None
    return fmt is not None and _backend(fmt).is_store(path)


def _remove_store(path: Path) -> None:
    """--overwrite removes only something that is recognisably a visionsae store."""
    if path.is_symlink():
        raise StoreError(f"{path} is a symbolic link: --overwrite does not follow it; pass the store's real path "
                         f"({os.path.realpath(path)}) or remove the link")
    if not is_store(path):
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
