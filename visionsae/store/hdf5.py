"""The HDF5 form of the store (cache_layout.md section 3), both sides: same paths, contiguous datasets.

Single-process: h5py holds the file open for the whole run. The file is laid out under a temporary
name and renamed into place, so a path that exists is a whole skeleton. Every dataset is allocated
when the file is created (HDF5's early allocation), and its disk blocks are reserved then
(``fallocate``): writing a shard's rows never grows the file, so a disk that fills up cannot hit the
rows. What still grows the file is HDF5's metadata (the manifest records); before each metadata
change the writer checks that the disk has room to spare, so a full disk stops the run with one line
and leaves a file h5py opens (HDF5 has no journal: a metadata flush cut short would break it).
Each shard's rows are written, the file is flushed and fsynced, and only then is the shard's manifest
attribute set (and flushed again).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from visionsae import faults
from visionsae.errors import StoreError
from visionsae.store.layout import (StoreSpec, crc32_of, free_bytes, mib, shard_record_name,
                                    storage_dtype)

FORMAT = "hdf5"
H5_ERRORS = (OSError, RuntimeError, ValueError, KeyError)  # what h5py raises when HDF5 fails (disk full: RuntimeError)


def image_key(name: str, shard: int) -> str:
    """The dataset holding image array ``name`` (every shard is a slice of it): writer and reader."""
    return f"/images/{name}"


def acts_key(layer: str, shard: int) -> str:
    return f"/layers/{layer}/acts"


def is_store(path: Path) -> bool:
    """An HDF5 file (format_on_disk says "hdf5") with visionsae's root attributes."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            return "visionsae" in f.attrs
    except H5_ERRORS:
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        faults.fsync(fd, path)
    finally:
        os.close(fd)


def _reserve(path: Path) -> bool:
    """Allocate disk blocks for the whole current length of ``path`` (no size change). False where the
    file system cannot (then writes may still find the disk full); OSError(ENOSPC) when it does not fit."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name or not hasattr(os, "posix_fallocate"):
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fallocate = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fallocate is None:
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if fallocate(fd, 0, 0, size) != 0:
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise OSError(err, os.strerror(err), str(path))
        return True
    finally:
        os.close(fd)


def _op(kind: str, target: str, fn, *args):
    return faults.operation(kind, target, fn, *args)


def create(path: Path, spec: StoreSpec) -> "H5ChunkWriter":
    import h5py
    if spec.compressed:
        raise StoreError("compressed mode is for Zarr stores; HDF5 stores stay contiguous (memory-mappable)")
    need = spec.shard_nbytes() * spec.n_shards + spec.n_shards * _record_bytes(spec) + (1 << 20)
    if free_bytes(path.parent) < need:
        raise StoreError(f"the HDF5 store needs about {mib(need)} (rows and manifest) but {path.parent} has "
                         f"{mib(free_bytes(path.parent))} free: free space or choose another --out")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    dcpl_args = dict(track_times=False, fill_time="never")
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["visionsae"] = json.dumps(spec.root_attrs())
            for name, dtype in (("index", "<i8"), ("label", "<i8"), ("valid", "u1")):
                f.create_dataset(f"images/{name}", shape=(spec.n_images,), dtype=dtype, dcpl=_early(), **dcpl_args)
            for layer in spec.layers:
                g = f.create_group(f"layers/{layer.name}", track_order=True)
                g.attrs["visionsae"] = json.dumps(layer.attrs(spec.dtype))
                g.create_dataset("acts", shape=(spec.n_images * layer.tokens_per_image, layer.d),
                                 dtype=storage_dtype(spec.dtype), dcpl=_early(), **dcpl_args)
                g.create_dataset("mean", shape=(layer.d,), dtype="<f8", dcpl=_early(), **dcpl_args)
            f.create_group("manifest", track_order=True)
        _reserve(tmp)
        _fsync(tmp)
        faults.replace(tmp, path)
    except H5_ERRORS as err:
        tmp.unlink(missing_ok=True)
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
            size = spec.shard_nbytes() * spec.n_shards
            raise StoreError(f"the HDF5 store needs about {mib(size)} but {path.parent} has "
                             f"{mib(free_bytes(path.parent))} free: free space or choose another --out") from None
        raise StoreError(f"cannot create the HDF5 store {path}: {_first_line(err)}") from None
    return reopen(path, spec, lambda attrs: None)


def reopen(path: Path, spec: StoreSpec, check_attrs: Callable[[dict[str, Any]], None]) -> "H5ChunkWriter":
    import h5py
    try:
        f = h5py.File(path, "r+")
    except H5_ERRORS as err:
        raise StoreError(f"{path} is not a readable HDF5 store ({_first_line(err)}): pass --overwrite to "
                         "replace it") from None
    if "visionsae" not in f.attrs or "manifest" not in f:
        f.close()
        raise StoreError(f"{path} is not a visionsae activation store: refusing to write into it")
    writer = H5ChunkWriter(path, spec, f)
    try:
        check_attrs(json.loads(f.attrs["visionsae"]))
        # early-allocated datasets (every file this writer creates): reserve their blocks again, in case the
        # file was copied (copies are sparse)
        if all(f[f"layers/{la.name}/acts"].id.get_offset() is not None for la in spec.layers):
            writer._reserved = _reserve(path)
    except OSError:
        writer._reserved = False
    except BaseException:
        f.close()
        raise
    return writer


class H5ChunkWriter:
    """Writes one HDF5 store; h5py holds the file open for the whole run."""

    def __init__(self, path: Path, spec: StoreSpec, file):
        self.path, self.spec, self._file = path, spec, file
        self._reserved = False

    def check_layout(self) -> None:
        pass  # the skeleton is renamed into place whole, and h5py opened it

    def _room(self, what: str, extra: int = 0) -> None:
        """Refuse before touching the file when the disk may not hold the next change: HDF5 metadata
        written on a full disk can leave a file h5py no longer opens."""
        need = extra + 4 * _record_bytes(self.spec) + (1 << 20)
        free = free_bytes(self.path)
        if free < need:
            raise StoreError(f"the disk is full ({mib(free)} free at {self.path.parent}; {what} needs at least "
                             f"{mib(need)}): free space, then rerun with --resume (shards already marked "
                             "complete are kept)")

    def _failed(self, what: str, err: BaseException) -> StoreError:
        text = _first_line(err)
        hint = "free space if the disk is full, then rerun with --resume"
        if "No space left" in str(err) or getattr(err, "errno", None) == errno.ENOSPC:
            text, hint = "the disk is full", "free space, then rerun with --resume (shards already marked complete are kept)"
        return StoreError(f"{what} in {self.path} failed ({text}): {hint}")

    def write_chunks(self, shard, index, label, valid_u8, stored):
        f = self._file
        start, stop = self.spec.shard_slots(shard)
        chunks = {}
        arrays = {image_key(a, shard): (data, start, stop)
                  for a, data in (("index", index), ("label", label), ("valid", valid_u8))}
        for layer in self.spec.layers:
            T = layer.tokens_per_image
            arrays[acts_key(layer.name, shard)] = (stored[layer.name], start * T, stop * T)
        self._room(f"shard {shard}", 0 if self._reserved else sum(d.nbytes for d, _, _ in arrays.values()))
        try:
            for name, (data, a, b) in arrays.items():
                _op("h5write", name, f[name].__setitem__, slice(a, b), data)
                chunks[name] = {"nbytes": int(data.nbytes), "crc32": crc32_of(data)}
            _op("h5flush", self.path, f.flush)
            _fsync(self.path)
        except H5_ERRORS as err:
            raise self._failed(f"writing shard {shard}", err) from None
        return chunks

    def write_record(self, shard, record):
        self._room(f"the record of shard {shard}")
        try:
            _op("h5attr", f"manifest/{shard_record_name(shard)}", self._file["manifest"].attrs.__setitem__,
                shard_record_name(shard), json.dumps(record))
            _op("h5flush", self.path, self._file.flush)
            _fsync(self.path)
        except H5_ERRORS as err:
            raise self._failed(f"writing the record of shard {shard}", err) from None

    def records(self):
        return _read_records(self._file, self.spec.n_shards)

    def write_final(self, layer_attrs, means, n_skipped):
        f = self._file
        self._room("finishing the store")
        try:
            for name, attrs in layer_attrs.items():
                # a finalize repeated after a crash rewrites nothing already there, so the file's bytes stay
                # those of an uninterrupted run (HDF5 counts attribute rewrites)
                if not np.array_equal(f[f"layers/{name}/mean"][()], means[name]):
                    _op("h5write", f"layers/{name}/mean", f[f"layers/{name}/mean"].__setitem__, slice(None),
                        means[name])
                if f[f"layers/{name}"].attrs.get("visionsae") != json.dumps(attrs):
                    _op("h5attr", f"layers/{name}", f[f"layers/{name}"].attrs.__setitem__, "visionsae",
                        json.dumps(attrs))
            root = json.loads(f.attrs["visionsae"])
            _op("h5flush", self.path, f.flush)
            final = json.dumps({**root, "complete": True, "n_skipped": n_skipped})
            if f.attrs["visionsae"] != final:
                _op("h5attr", "/", f.attrs.__setitem__, "visionsae", final)
            _op("h5flush", self.path, f.flush)
            _fsync(self.path)
        except H5_ERRORS as err:
            raise self._failed("finishing the store", err) from None

    def close(self):
        try:
            if self._file.id.valid:
                self._file.close()
        except H5_ERRORS:
            pass  # only after a failure already reported: everything that counts was flushed before


def _read_records(f, n_shards: int | None) -> dict[int, dict[str, Any]]:
    """Every parseable record of the manifest's attributes (of shards 0..n_shards-1 when given); a damaged
    record counts as not written: the shard is redone on resume."""
    out = {}
    attrs = f["manifest"].attrs if "manifest" in f else {}
    for name, value in attrs.items():
        s = name.split("-")[-1]
        if not (name.startswith("shard-") and s.isdigit()) or (n_shards is not None and int(s) >= n_shards):
            continue
        try:
            out[int(s)] = json.loads(value)
        except ValueError:
            continue
    return out


def _record_bytes(spec: StoreSpec) -> int:
    """A generous size of one manifest record: its JSON holds every layer's d column sums."""
    return 600 + sum(26 * layer.d for layer in spec.layers)


def _early():
    """Dataset creation properties: space allocated at creation (so rows never grow the file)."""
    import h5py
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


# --- reading -------------------------------------------------------------------------------------
class H5Reader:
    """Read access for the reader: attributes, small arrays, and memory maps of ``acts``."""

    format = FORMAT

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

    def records(self, n_shards: int | None = None) -> dict[int, dict[str, Any]]:
        return _read_records(self.file, n_shards)

    image_key = staticmethod(image_key)
    acts_key = staticmethod(acts_key)

    def _acts_array(self, layer: str, dtype: np.dtype) -> np.ndarray:
        dset = self.file[f"layers/{layer}/acts"]
        offset = dset.id.get_offset()
        if offset is None or dset.chunks is not None or dset.compression:
            return dset  # not contiguous on disk (e.g. written by another tool): h5py slicing still works
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=dset.shape)

    def shard_acts(self, info, shard: int, a: int, b: int, ips: int) -> np.ndarray:
        # one dataset holds every shard: rows a..b are the shard's, whatever its number and size
        if info.name not in self._acts:
            self._acts[info.name] = self._acts_array(info.name, storage_dtype(info.dtype))
        arr = self._acts[info.name]
        return arr[a:b] if isinstance(arr, np.memmap) else np.asarray(arr[a:b])

    def read_acts_into(self, info, shard: int, a: int, b: int, ips: int, out: np.ndarray):
        out[: b - a] = self.shard_acts(info, shard, a, b, ips)
        return memoryview(out[: b - a]).cast("B")

    def chunk_bytes(self, key: str, start: int, stop: int) -> memoryview:
        """The bytes a manifest checksum covers: elements start..stop (the shard's) of dataset ``key``."""
        return memoryview(np.ascontiguousarray(self.file[key][start:stop])).cast("B")


open_reader = H5Reader  # the Backend entry point of the read side
