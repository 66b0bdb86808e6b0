"""Names, dtypes, checksums and fingerprints of the activation store (cache_layout.md, version 1).

Everything here is a direct transcription of the spec, shared by the writer and the reader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMAT = "visionsae-activations"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def format_on_disk(path: Path) -> str | None:
    """What an existing path would be as a store: "zarr" (a directory), "hdf5" (a file that starts with the
    HDF5 signature) or None (another file). Whether it holds visionsae attributes is the backend's check."""
    if path.is_dir():
        return "zarr"
    with open(path, "rb") as f:
        return "hdf5" if f.read(8) == HDF5_SIGNATURE else None


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    name: str  # group name, e.g. "block_11"
    source: str  # backbone module, e.g. "blocks.11"
    kind: str  # residual | embedding | stage
    d: int
    tokens_per_image: int
    token_kind: str

    def attrs(self, dtype: str) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "kind": self.kind, "d": int(self.d),
                "tokens_per_image": int(self.tokens_per_image), "token_kind": self.token_kind, "dtype": dtype}


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """What a writer needs to lay out a store; the root attributes derive from it."""

    backbone: Mapping[str, Any]  # id, weights, fingerprint, preprocessing
    dataset: Mapping[str, Any]  # id, root, split, n_images, classes
    tokens: str
    dtype: str
    layers: tuple[LayerSpec, ...]
    images_per_shard: int = 1024
    extract: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    format: str = "zarr"  # zarr | hdf5
    compressed: bool = False  # zarr archive mode (zstd); not memory-mappable

    @property
    def n_images(self) -> int:
        return int(self.dataset["n_images"])

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.images_per_shard)

    def shard_slots(self, shard: int) -> tuple[int, int]:
        start = shard * self.images_per_shard
        return start, min(start + self.images_per_shard, self.n_images)

    def root_attrs(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "backbone": dict(self.backbone), "dataset": dict(self.dataset),
            "tokens": self.tokens, "dtype": self.dtype,
            "images_per_shard": int(self.images_per_shard), "n_images": self.n_images,
            "n_shards": self.n_shards, "layers": [layer.name for layer in self.layers],
            "extract": dict(self.extract), "complete": False, "n_skipped": 0,
        }

    def validate(self) -> None:
        from visionsae.errors import StoreError
        if self.dtype not in DTYPES:
            raise StoreError(f"unknown store dtype '{self.dtype}': choose one of {', '.join(DTYPES)}")
        if self.format not in ("zarr", "hdf5"):
            raise StoreError(f"unknown store format '{self.format}': choose zarr or hdf5")
        if self.n_images <= 0:
            raise StoreError("the dataset has no images: nothing to extract")
        if self.images_per_shard <= 0:
            raise StoreError("images_per_shard must be positive")
        names = [layer.name for layer in self.layers]
        if not names or len(set(names)) != len(names):
            raise StoreError(f"layers must be a non-empty list of distinct names, got {names}")
        need = self.writer_memory()
        have = physical_memory()
        if need > have // 2:
            raise StoreError(f"--images-per-shard {self.images_per_shard} needs about {mib(need)} of memory to write "
                             f"one shard ({mib(self.shard_nbytes(padded=self.format == 'zarr'))} per chunk set, up to "
                             f"three in flight), more than half of this machine's {mib(have)}: lower "
                             "--images-per-shard (default 1024)")

    def shard_nbytes(self, padded: bool = False) -> int:
        """Bytes of one shard's rows over every layer: a full shard, or its Zarr chunk files (which are
        always full size, even for a short last shard)."""
        slots = self.images_per_shard if padded else min(self.images_per_shard, self.n_images)
        item = storage_dtype(self.dtype).itemsize
        return sum(slots * layer.tokens_per_image * layer.d * item for layer in self.layers)

    def writer_memory(self) -> int:
        """What writing needs in memory: the shard being computed and the one being written (stored dtype),
        their float32 statistics blocks, and a padded copy of a short last Zarr chunk."""
        pad = self.shard_nbytes(padded=True) if self.format == "zarr" and self.n_images % self.images_per_shard else 0
        return 3 * self.shard_nbytes() + pad


def storage_dtype(dtype: str) -> np.dtype:
    """numpy dtype of the stored bytes: bfloat16 is kept as its upper 16 bits in uint16."""
    return np.dtype({"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}[dtype])


def torch_dtype(dtype: str):
    """torch dtype of the stored values (torch.bfloat16 for bfloat16, whose bits the stored uint16 are)."""
    import torch  # the store itself works without torch
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> float32 (a copy)."""
    if dtype == "bfloat16":
        return (np.asarray(arr, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.array(arr, dtype=np.float32)  # always a copy: callers may modify it


def to_storage(x: Any, dtype: str) -> np.ndarray:
    """A torch tensor or numpy array of floats -> C-contiguous array of the stored dtype."""
    try:
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu")
            if dtype == "bfloat16":
                # Round to nearest even exactly as torch does, then keep the raw bits.
                return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
            return np.ascontiguousarray(x.to(torch.float32 if dtype == "float32" else torch.float16).numpy())
    except ImportError:  # pragma: no cover - torch is a dependency, but the store works without it
        pass
    x = np.asarray(x)
    if dtype == "bfloat16":
        if x.dtype == np.uint16:
            return np.ascontiguousarray(x)
        import torch
        return to_storage(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), dtype)
    return np.ascontiguousarray(x, dtype=storage_dtype(dtype))


def shard_record_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def crc32_of(data: bytes | memoryview | np.ndarray) -> int:
    if isinstance(data, np.ndarray):
        data = memoryview(np.ascontiguousarray(data)).cast("B")
    return zlib.crc32(data) & 0xFFFFFFFF


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def store_fingerprint(root: Mapping[str, Any], layers: list[Mapping[str, Any]]) -> str:
    """Section 9: identity of the store's content, independent of its path."""
    ident = {
        "backbone": {"id": root["backbone"].get("id"), "fingerprint": root["backbone"].get("fingerprint")},
        "dataset": {k: root["dataset"].get(k) for k in ("id", "split", "n_images")},
        "tokens": root["tokens"], "dtype": root["dtype"],
        "layers": [[la["name"], int(la["d"]), int(la["tokens_per_image"])] for la in layers],
    }
    return "sha256:" + hashlib.sha256(canonical_json(ident).encode()).hexdigest()


def layer_fingerprint(root: Mapping[str, Any], layer: Mapping[str, Any]) -> str | None:
    """Section 9: identity of the function that computed one layer's rows (backbone weights and preprocessing,
    token selection, layer), not of the images. Two stores with equal layer fingerprints hold the same layer of
    the same backbone over possibly different images: an SAE trained on one can be evaluated on the other.
    None when the backbone has no weight fingerprint (array stores), which then matches nothing."""
    backbone = root["backbone"]
    if not backbone.get("fingerprint"):
        return None
    ident = {
        "backbone": {k: backbone.get(k) for k in ("id", "fingerprint", "preprocessing")},
        "tokens": root["tokens"],
        "layer": {k: layer.get(k) for k in ("name", "source", "kind", "d", "tokens_per_image", "token_kind")},
    }
    return "sha256:" + hashlib.sha256(canonical_json(ident).encode()).hexdigest()


def weights_fingerprint(state_dict: Mapping[str, Any]) -> str:
    """Section 7: sha256 over (key, dtype, shape, bytes) of every tensor, in key order."""
    import torch
    h = hashlib.sha256()
    for key, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        # view as bytes so that dtypes numpy lacks (bfloat16) hash too
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def write_store_file(path: Path, data: bytes | memoryview) -> None:
    """``visionsae.atomic.atomic_write`` with the store's one-line errors (a full disk says to resume)."""
    from visionsae.atomic import atomic_write
    from visionsae.errors import StoreError
    try:
        atomic_write(path, data)
    except OSError as err:
        if err.errno == 28:  # ENOSPC
            raise StoreError(f"the disk is full while writing {path}: free space, then rerun with --resume "
                             "(shards already marked complete are kept)") from None
        raise StoreError(f"cannot write {path}: {err.strerror or err}; check the --out location") from None


def free_bytes(path: Path) -> int:
    """Bytes available to this user on the file system holding ``path`` (its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 40


def aggregate_stats(records: Mapping[int, Mapping[str, Any]], layer: str, d: int,
                    n_shards: int) -> tuple[int, np.ndarray, float]:
    """(count, float64 column sums, sum of squared norms) of ``layer`` over shards 0..n_shards-1, summed in
    shard order (cache_layout.md section 5). The writer stores what this gives and the reader recomputes
    it, so both must be this one function. A record without the layer's statistics raises KeyError."""
    count, total, sq = 0, np.zeros(d, dtype=np.float64), 0.0
    for s in range(n_shards):
        st = records[s]["stats"][layer]
        count += int(st["count"])
        total += np.asarray(st["sum"], dtype=np.float64)
        sq += float(st["sum_sq_norm"])
    return count, total, sq
