"""Zarr metadata for tools that are not visionsae (cache_layout.md section 2): dimension names and the
consolidated metadata written at finalize, so xarray's ``open_zarr`` / ``open_datatree`` open a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

# The dimension names of each array (Zarr v3 ``dimension_names``), by the array's last path component.
DIMENSION_NAMES = {"index": ("slot",), "label": ("slot",), "valid": ("slot",),
                   "acts": ("row", "feature"), "mean": ("feature",)}


def consolidated_metadata(store: Path, nodes: Iterable[str]) -> dict[str, Any]:
    """The root's ``consolidated_metadata`` (zarr-python 3's inline form): the ``zarr.json`` of each of
    ``nodes`` (paths below the root: every group and array except the manifest's records), by path.

    The records are left out (the ``manifest`` entry says ``consolidated_metadata: null``) because they
    grow with the number of shards and hold per-shard statistics: copied into the root, every open of the
    store would parse all of them. zarr-python then sees ``manifest`` as empty through the consolidated
    root; readers of the records open the store with ``use_consolidated=False`` or read the files.
    """
    flat: dict[str, Any] = {}
    for rel in nodes:
        meta = json.loads((store / rel / "zarr.json").read_text())
        if meta.get("node_type") == "group":
            meta["consolidated_metadata"] = (None if rel == "manifest" else
                                             {"kind": "inline", "must_understand": False, "metadata": {}})
        flat[rel] = meta
    ordered = {key: flat[key] for key in sorted(flat, key=lambda k: (k.count("/"), k))}
    return {"kind": "inline", "must_understand": False, "metadata": ordered}
