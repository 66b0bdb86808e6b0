"""Synthetic activation stores for the benchmarks, written by cache_layout.md without visionsae's writer.

zarr lays out the metadata; chunk files and manifest records are written as the spec defines them
(sections 2, 6 and 9), shard by shard, so a store of 10,000 shards or of 40 GB is written without
holding more than one shard in memory. The caller supplies each shard's rows and labels.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

LAYER = "L"


@dataclass
class Shape:
    n_shards: int
    images_per_shard: int
    tokens_per_image: int
    d: int
    split: str = "train"  # part of the store fingerprint: two splits are sibling stores (section 9)

    @property
    def n_images(self) -> int:
        return self.n_shards * self.images_per_shard


@dataclass
class ShardRows:
    rows_RD: np.ndarray  # float16, images_per_shard * tokens_per_image rows
    labels_I: np.ndarray  # int64 class of each image
    sum_D: np.ndarray  # float64 sum of the rows (the caller may know it more cheaply than by summing)
    sum_sq_norm: float  # float64 sum of the rows' squared norms


def exact_stats(rows_RD: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-shard statistics by the definition (float64 over the stored float16 values)."""
    r64 = rows_RD.astype(np.float64)
    return r64.sum(0), float((r64 ** 2).sum())


def root_attributes(shape: Shape, n_classes: int, complete: bool) -> dict:
    # A non-null backbone fingerprint gives the layer a fingerprint, so stores of two splits are siblings.
    return {
        "format": "visionsae-activations", "format_version": 1,
        "backbone": {"id": "synthetic", "weights": "none", "fingerprint": "sha256:" + "0" * 64,
                     "preprocessing": None},
        "dataset": {"id": "synthetic", "root": None, "split": shape.split, "n_images": shape.n_images,
                    "classes": [f"class {c}" for c in range(n_classes)]},
        "tokens": "all" if shape.tokens_per_image > 1 else "cls", "dtype": "float16",
        "images_per_shard": shape.images_per_shard, "n_images": shape.n_images, "n_shards": shape.n_shards,
        "layers": [LAYER], "extract": {}, "complete": complete, "n_skipped": 0}


def write_store(path: Path, shape: Shape, shard: Callable[[int], ShardRows], n_classes: int = 10,
                link_from: Path | None = None) -> None:
    """A complete float16 store of one layer ``L``. ``shard(s)`` gives shard s's rows; with ``link_from``
    (a store of the same shape written by this function) the chunk files are hard links to its files and
    the records are copied, so a sibling store of another split costs no disk space."""
    import zarr

    n, T, D, ips = shape.n_images, shape.tokens_per_image, shape.d, shape.images_per_shard
    root_attrs = root_attributes(shape, n_classes, complete=False)
    root = zarr.open_group(str(path), mode="w", attributes={"visionsae": root_attrs})
    raw = {"compressors": None, "filters": None, "fill_value": 0}
    for name, dtype in (("index", "int64"), ("label", "int64"), ("valid", "uint8")):
        root.create_array(f"images/{name}", shape=(n,), chunks=(ips,), dtype=dtype, **raw)
    layer_attrs = {"name": LAYER, "source": "synthetic", "kind": "residual" if T > 1 else "embedding", "d": D,
                   "tokens_per_image": T, "token_kind": "all" if T > 1 else "embedding", "dtype": "float16",
                   "count": n * T, "mean_sq_norm": 0.0}
    layer = root.create_group(f"layers/{LAYER}", attributes={"visionsae": layer_attrs})
    layer.create_array("acts", shape=(n * T, D), chunks=(ips * T, D), dtype="float16", **raw)
    layer.create_array("mean", shape=(D,), chunks=(D,), dtype="float64", **raw)
    root.create_group("manifest")
    sum_D, sum_sq = np.zeros(D), 0.0
    for s in range(shape.n_shards):
        rec_rel = Path("manifest") / f"shard-{s:06d}" / "zarr.json"
        if link_from is not None:
            record = json.loads((link_from / rec_rel).read_text())["attributes"]["visionsae"]
            for key in record["chunks"]:
                (path / key).parent.mkdir(parents=True, exist_ok=True)
                (path / key).hardlink_to(link_from / key)
            st = record["stats"][LAYER]
            shard_sum, shard_sq = np.asarray(st["sum"]), st["sum_sq_norm"]
        else:
            a, b = s * ips, (s + 1) * ips
            data = shard(s)
            blobs = {f"images/index/c/{s}": np.arange(a, b, dtype="<i8").tobytes(),
                     f"images/label/c/{s}": data.labels_I.astype("<i8").tobytes(),
                     f"images/valid/c/{s}": np.ones(ips, dtype="u1").tobytes(),
                     f"layers/{LAYER}/acts/c/{s}/0": memoryview(np.ascontiguousarray(data.rows_RD, "<f2"))}
            chunks = {}
            for key, blob in blobs.items():
                (path / key).parent.mkdir(parents=True, exist_ok=True)
                (path / key).write_bytes(blob)
                chunks[key] = {"nbytes": len(blob) if isinstance(blob, bytes) else blob.nbytes,
                               "crc32": zlib.crc32(blob) & 0xFFFFFFFF}
            shard_sum, shard_sq = data.sum_D, data.sum_sq_norm
            record = {"shard": s, "slots": [a, b], "n_valid": ips, "skipped": [], "chunks": chunks,
                      "stats": {LAYER: {"count": ips * T, "sum": np.asarray(shard_sum, np.float64).tolist(),
                                        "sum_sq_norm": float(shard_sq)}}}
        sum_D += shard_sum
        sum_sq += shard_sq
        (path / rec_rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rec_rel).write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                "attributes": {"visionsae": record}}))
    (path / f"layers/{LAYER}/mean/c").mkdir(parents=True, exist_ok=True)
    (path / f"layers/{LAYER}/mean/c/0").write_bytes((sum_D / (n * T)).astype("<f8").tobytes())
    layer.attrs["visionsae"] = {**layer_attrs, "mean_sq_norm": sum_sq / (n * T)}
    root.attrs["visionsae"] = {**root_attrs, "complete": True}  # last: an interrupted write is incomplete
