"""Optional parts of a store (cache_layout.md section 11): the backbone's classifier head.

The head is written after the store is complete and read only by evaluation (the explorer applies it
to SAE decoder directions). It lives in its own group, ``head/``, so that a store without it, or a
reader that ignores it, is unaffected. Zarr: the new group is written and fsynced under a temporary name,
the old one is renamed aside (``head.old-<pid>``), the new one into place, and the old one removed; a crash
at any point leaves a whole head, new or old, and a reader that finds ``head`` missing reads the old one
beside it. HDF5: one group ``/head``.

Shape suffixes: C classes, D width of the layer that feeds the head.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from visionsae import faults
from visionsae.atomic import fsync_dir
from visionsae.errors import StoreError
from visionsae.store.consolidate import consolidated_metadata
from visionsae.store.layout import write_store_file
from visionsae.store.zarr import read_json

HEAD_VERSION = 1
HEAD_DIMENSION_NAMES = {"weight": ("class", "feature"), "bias": ("class",)}


class ClassifierHead(NamedTuple):
    """logits_C = weight_CD @ x_D + bias_C, for x a row of the layer named by ``attrs["input"]``."""

    weight_CD: np.ndarray  # float32
    bias_C: np.ndarray  # float32
    attrs: dict[str, Any]  # version, input, source, d, n_classes, classes, class_ids

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])


def head_attrs(weight_CD: np.ndarray, *, input_kind: str, source: str, classes: list[str],
               class_ids: list[str] | None = None) -> dict[str, Any]:
    C, D = weight_CD.shape
    if len(classes) != C:
        raise StoreError(f"the classifier head has {C} outputs but {len(classes)} class names were given")
    return {"version": HEAD_VERSION, "input": input_kind, "source": source, "d": int(D), "n_classes": int(C),
            "classes": [str(c) for c in classes],
            "class_ids": [str(c) for c in class_ids] if class_ids is not None else None}


def write_head(path: str | Path, weight_CD: np.ndarray, bias_C: np.ndarray, attrs: dict[str, Any]) -> None:
    """Add (or replace) the classifier head of the complete store at ``path``."""
    path = Path(path)
    weight_CD = np.ascontiguousarray(weight_CD, dtype="<f4")
    bias_C = np.ascontiguousarray(bias_C, dtype="<f4")
    if bias_C.shape != (weight_CD.shape[0],) or attrs.get("d") != weight_CD.shape[1]:
        raise StoreError(f"classifier head of shape {weight_CD.shape} with bias {bias_C.shape} does not match "
                         f"its attributes (d = {attrs.get('d')})")
    if path.is_dir():
        import zarr
        tmp = path / f"head.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(str(tmp), mode="w", attributes={"visionsae": attrs})
        for name, arr in (("weight", weight_CD), ("bias", bias_C)):
            group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape, fill_value=0,
                               compressors=None, filters=None, dimension_names=HEAD_DIMENSION_NAMES[name])[...] = arr
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    faults.fsync(fh.fileno(), f)
        final, old = path / "head", path / f"head.old-{os.getpid()}"
        if final.exists():
            faults.replace(final, old)
        faults.replace(tmp, final)
        fsync_dir(path)
        for stale in [*path.glob("head.old-*"), *path.glob("head.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        _consolidate_head(path)
        return
    import h5py
    with h5py.File(path, "r+") as f:
        if "head" in f:
            del f["head"]
        g = f.create_group("head")
        g.create_dataset("weight", data=weight_CD, track_times=False)
        g.create_dataset("bias", data=bias_C, track_times=False)
        g.attrs["visionsae"] = json.dumps(attrs)  # last: a head without attributes is ignored


def _consolidate_head(path: Path) -> None:
    """Add the head's nodes to the root's consolidated metadata (written at finalize, before the head), so
    tools that open the store through it (xarray) see the head too."""
    root_file = path / "zarr.json"
    root = read_json(root_file, path)
    if not isinstance(root.get("consolidated_metadata"), dict):
        return  # an unconsolidated store: readers list the nodes themselves
    nodes = dict.fromkeys([*root["consolidated_metadata"]["metadata"], "head", "head/weight", "head/bias"])
    root["consolidated_metadata"] = consolidated_metadata(path, nodes)
    write_store_file(root_file, json.dumps(root, indent=2).encode())


def _zarr_head_dir(path: Path) -> Path | None:
    """``head/``, or the previous head a replacement killed between its two renames left beside it."""
    if (path / "head" / "zarr.json").is_file():
        return path / "head"
    old = sorted(p for p in path.glob("head.old-*") if (p / "zarr.json").is_file())
    return old[-1] if old else None


def read_head(path: str | Path) -> ClassifierHead | None:
    """The store's classifier head, or None when it has none (or only part of one)."""
    path = Path(path)
    try:
        if path.is_dir():
            head_dir = _zarr_head_dir(path)
            if head_dir is None:
                return None
            import zarr
            group = zarr.open_group(str(head_dir), mode="r")
            attrs = dict(group.attrs).get("visionsae")
            weight, bias = group["weight"][...], group["bias"][...]
        else:
            import h5py
            with h5py.File(path, "r") as f:
                if "head" not in f or "visionsae" not in f["head"].attrs:
                    return None
                attrs = json.loads(f["head"].attrs["visionsae"])
                weight, bias = f["head/weight"][...], f["head/bias"][...]
    except (KeyError, OSError, ValueError) as err:
        raise StoreError(f"the classifier head of {path} is damaged ({type(err).__name__}): rerun sae-extract "
                         "with --resume to write it again") from None
    if not isinstance(attrs, dict) or attrs.get("version") != HEAD_VERSION:
        return None  # another version of this optional part: ignored, never misread
    if weight.shape != (attrs["n_classes"], attrs["d"]) or bias.shape != (attrs["n_classes"],):
        raise StoreError(f"the classifier head of {path} has weight {weight.shape} and bias {bias.shape}, its "
                         f"attributes say {attrs['n_classes']} x {attrs['d']}: rerun sae-extract --resume")
    return ClassifierHead(np.asarray(weight, dtype=np.float32), np.asarray(bias, dtype=np.float32), attrs)
