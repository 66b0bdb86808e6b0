"""Reading an activation store (Zarr or HDF5) through one API; activations are memory-mapped.

What is format-neutral lives here (what a complete store is, the manifest's checks, checksums, row
geometry); ``store.zarr`` and ``store.hdf5`` read the bytes behind the interface of ``store.backend``.

``open_store(path)`` checks that the path is a complete store of a known format version and
returns a ``Store``. Shards are read straight from their chunk files with ``np.memmap`` (no
decoding) unless the store was written in compressed archive mode, where zarr decodes them.

Costs are O(1) per shard, whatever the number of shards: the manifest is parsed once (on first use,
so opening reads only the root and layer metadata), a verified chunk is never verified again, and at
most MAX_OPEN_MAPS shard memory maps, and at most MAX_MAPPED_BYTES of them, are held (each holds a file
descriptor, and the pages of its file that were read count in the process's resident memory until it is
unmapped; an LRU closes the rest).
The first use of a layer cross-checks its ``mean`` and its ``count`` / ``mean_sq_norm`` attributes
against the per-shard statistics of the manifest, since the trainer takes its input scale from them.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from visionsae.errors import StoreError
from visionsae.store import hdf5, zarr
from visionsae.store.backend import ChunkReader
from visionsae.store.layout import (FORMAT, FORMAT_VERSION, aggregate_stats, format_on_disk, crc32_of,
                                    layer_fingerprint, shard_record_name, store_fingerprint, to_float32)

MAX_OPEN_MAPS = 32  # shard memory maps kept open (one file descriptor each)
# ... and their bytes: at ImageNet's shape a shard is 310 MB, and 32 maps that were read whole showed as
# 10 GB of sae-eval's resident memory (clean page cache the kernel may drop, but memory to anyone looking).
MAX_MAPPED_BYTES = 1 << 30
IMAGE_ARRAYS = ("index", "label", "valid")
STATS_RTOL = 1e-9  # float64 sums in another order (a plain-zarr writer) agree to far better than this


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
    fmt = format_on_disk(path)
    if fmt is None:
        raise StoreError(f"{path} is not an activation store (neither a Zarr directory nor an HDF5 file)")
    source: ChunkReader = (zarr if fmt == "zarr" else hdf5).open_reader(path)
    return Store(path, source)


class Store:
    def __init__(self, path: Path, source: ChunkReader):
        self.path, self._src = path, source
        self.format = source.format
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
        self.n_shards = _derived_counts(path, attrs)
        self.dtype = attrs["dtype"]
        self.layer_names: list[str] = list(attrs["layers"])
        self._layers = {name: self._load_layer(name) for name in self.layer_names}
        self._stats_checked: set[str] = set()
        self._verified: set[tuple[int, str]] = set()  # (shard, chunk key) whose checksum matched
        self._maps: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._mapped_bytes = 0  # bytes of the maps held in _maps

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
        if name not in self._stats_checked:
            self._check_stats(self._layers[name])
        return self._layers[name]

    def _check_stats(self, info: LayerInfo) -> None:
        """The layer's mean, count and mean_sq_norm must be what the manifest's per-shard sums give
        (cache_layout.md section 5): they carry no checksum of their own, and they set the input scale."""
        records = {s: self.record(s) for s in range(self.n_shards)}
        for s, rec in records.items():
            st = rec.get("stats", {}).get(info.name)
            if not isinstance(st, dict) or not {"count", "sum", "sum_sq_norm"} <= st.keys():
                raise StoreError(f"manifest record {shard_record_name(s)} of {self.path} has no statistics for "
                                 f"layer '{info.name}': the record is damaged; delete it and rerun sae-extract --resume")
        count, total, sq = aggregate_stats(records, info.name, info.d, self.n_shards)
        mean, msq = total / max(count, 1), sq / max(count, 1)
        bad = None
        if count != info.count:
            bad = f"count {info.count} (the manifest's shards hold {count} rows)"
        elif info.mean.shape != mean.shape or not np.allclose(info.mean, mean, rtol=STATS_RTOL,
                                                                atol=STATS_RTOL * max(np.abs(mean).max(initial=0), 1e-30)):
            bad = "mean array (it differs from the mean of the manifest's per-shard sums)"
        elif not abs(info.mean_sq_norm - msq) <= STATS_RTOL * max(abs(msq), 1e-300):
            bad = f"mean_sq_norm {info.mean_sq_norm!r} (the manifest's per-shard sums give {msq!r})"
        if bad:
            raise StoreError(f"layer '{info.name}' of {self.path} has a wrong {bad}: the layer statistics were "
                             "edited or damaged; re-extract the store")
        self._stats_checked.add(info.name)

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
        arr = self._maps.get(key)
        if arr is None:
            # every reader checks a shard's chunks before its rows are used (a set lookup once verified)
            self.verify_shard(shard, layers=[info.name])
            a, b = self.shard_rows(info.name, shard)
            arr = self._maps[key] = self._src.shard_acts(info, shard, a, b, self.images_per_shard)
            self._mapped_bytes += arr.nbytes
            while len(self._maps) > 1 and (len(self._maps) > MAX_OPEN_MAPS or self._mapped_bytes > MAX_MAPPED_BYTES):
                _, old = self._maps.popitem(last=False)  # unmapped (and its file closed) once no caller holds it
                self._mapped_bytes -= old.nbytes
        else:
            self._maps.move_to_end(key)
        return arr

    def read_shard_into(self, layer: str, shard: int, out: np.ndarray) -> int:
        """Copy shard ``shard``'s rows of ``layer`` into ``out`` (storage dtype, C-contiguous, at least
        images_per_shard * T rows) in one sequential read, verifying the checksum on the bytes read
        (no second read of the file). Returns the number of rows (the last shard may be short)."""
        info = self.layer(layer)
        a, b = self.shard_rows(info.name, shard)
        key = self._src.acts_key(info.name, shard)
        want = self.record(shard)["chunks"][key]
        data = self._src.read_acts_into(info, shard, a, b, self.images_per_shard, out)
        if data is None:
            raise StoreError(f"{self.path} is missing the chunk file {key} of shard {shard}: re-extract that shard "
                             f"(delete manifest record {shard_record_name(shard)} and rerun sae-extract --resume)")
        if (shard, key) not in self._verified:
            self._check_crc(shard, key, want, data)
        return b - a

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
    @cached_property
    def _records(self) -> dict[int, dict[str, Any]]:
        """The manifest, parsed once."""
        return self._src.records(self.n_shards)

    def chunk_keys(self, shard: int, layers: list[str] | None = None) -> list[str]:
        """The chunk keys a complete record of ``shard`` lists: the image arrays and each layer's acts."""
        return [key for key, _, _ in self._chunk_spans(shard, layers)]

    def _chunk_spans(self, shard: int, layers: list[str] | None = None) -> list[tuple[str, int, int]]:
        """(chunk key, first and end element of the shard in that array) of each chunk of ``shard``."""
        names = self.layer_names if layers is None else layers
        a, b = self.shard_slots(shard)
        spans = [(self._src.image_key(n, shard), a, b) for n in IMAGE_ARRAYS]
        for n in names:
            T = (self._layers.get(n) or self.layer(n)).tokens_per_image  # no statistics check: only geometry
            spans.append((self._src.acts_key(n, shard), a * T, b * T))
        return spans

    def record(self, shard: int) -> dict[str, Any]:
        """Shard ``shard``'s manifest record, which must list every chunk of the shard."""
        rec = self._records.get(shard)
        if not isinstance(rec, dict):
            raise StoreError(f"shard {shard} of {self.path} has no manifest record: re-extract it with --resume")
        chunks = rec.get("chunks")
        listed = chunks if isinstance(chunks, dict) else {}
        for key in self.chunk_keys(shard):
            entry = listed.get(key)
            if not (isinstance(entry, dict) and isinstance(entry.get("nbytes"), int)
                    and isinstance(entry.get("crc32"), int)):
                raise StoreError(f"manifest record {shard_record_name(shard)} of {self.path} does not list chunk "
                                 f"{key} with its size and checksum: the record is damaged; delete it and rerun "
                                 "sae-extract --resume")
        return rec

    def _check_crc(self, shard: int, key: str, want: dict[str, int], data) -> None:
        if len(data) != want["nbytes"] or crc32_of(data) != want["crc32"]:
            raise StoreError(f"shard {shard} of {self.path} fails its checksum ({key}): the file is corrupt; "
                             f"delete manifest record {shard_record_name(shard)} and rerun sae-extract --resume")
        self._verified.add((shard, key))

    def verify_shard(self, shard: int, layers: list[str] | None = None) -> None:
        """Check the checksum of every chunk of ``shard`` (or of its image arrays and ``layers`` only).
        Each chunk is checked once per Store: a later call costs a set lookup."""
        chunks = self.record(shard)["chunks"]
        for key, start, stop in self._chunk_spans(shard, layers):
            if (shard, key) in self._verified:
                continue
            data = self._src.chunk_bytes(key, start, stop)
            if data is None:
                raise StoreError(f"{self.path} is missing the chunk file {key} of shard {shard}: re-extract that "
                                 f"shard (delete manifest record {shard_record_name(shard)} and rerun sae-extract "
                                 "--resume)")
            self._check_crc(shard, key, chunks[key], data)

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


def _derived_counts(path: Path, attrs: dict[str, Any]) -> int:
    """The number of shards, derived from n_images and images_per_shard; the stored copies of what is
    derivable (``n_shards``, ``dataset.n_images``) must agree, or the store was edited or damaged."""
    n_images, ips = int(attrs["n_images"]), int(attrs["images_per_shard"])
    if n_images <= 0 or ips <= 0:
        raise StoreError(f"{path} has n_images {n_images} and images_per_shard {ips}: both must be positive; "
                         "the store metadata is damaged, re-extract it")
    n_shards = -(-n_images // ips)
    stored = {"n_shards": (attrs.get("n_shards"), n_shards),
              "dataset.n_images": ((attrs.get("dataset") or {}).get("n_images"), n_images)}
    for key, (have, want) in stored.items():
        if have != want:
            raise StoreError(f"{path} records {key} = {have!r} but its n_images and images_per_shard give {want}: "
                             "the store metadata was edited or damaged; re-extract it")
    return n_shards
