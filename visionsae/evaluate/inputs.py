"""What an evaluation reads: checkpoints, the store each was trained on, the images to use.

Every mismatch between a checkpoint and a store is a one-line error here, before any work:
a missing store, another layer, another width, another backbone (store fingerprint), an empty
held-out split. Checkpoints that share store and layer form a group, evaluated in one pass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionsae.errors import CheckpointError, StoreError, UserError
from visionsae.sae import SparseAutoencoder, load_checkpoint
from visionsae.store import Store, open_store


@dataclasses.dataclass
class Checkpoint:
    path: Path
    name: str  # short label for tables and plots
    model: SparseAutoencoder
    meta: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]


@dataclasses.dataclass
class Group:
    """Checkpoints of one store layer: one pass over its images serves them all."""

    store: Store
    layer: str
    checkpoints: list[Checkpoint]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device: use --device cpu")
    return torch.device(device)


def load_checkpoints(paths: list[str], device: torch.device) -> list[Checkpoint]:
    out = []
    for p in paths:
        model, meta = load_checkpoint(p, device)
        for key in ("config", "store", "split"):
            if not isinstance(meta.get(key), dict):
                raise CheckpointError(f"{p} lacks its '{key}' record: it was not written by sae-train")
        out.append(Checkpoint(Path(p), "", model, meta))
    for ck, name in zip(out, _short_names([c.path for c in out])):
        ck.name = name
    return out


def _short_names(paths: list[Path]) -> list[str]:
    """'runs/topk/ckpt.pt' -> 'topk'; the full path where the short names would collide."""
    short = [(p.parent.name or p.stem) if p.name == "ckpt.pt" else p.stem for p in paths]
    return short if len(set(short)) == len(short) else [str(p) for p in paths]


def group_checkpoints(checkpoints: list[Checkpoint], store_override: str | None) -> list[Group]:
    stores: dict[str, Store] = {}
    groups: dict[tuple[str, str], Group] = {}
    for ck in checkpoints:
        rec = ck.meta["store"]
        path = store_override or rec.get("path")
        if not path:
            raise CheckpointError(f"{ck.path} records no store path: pass the store it was trained on with --store")
        if not Path(path).exists():
            raise StoreError(f"the store {path} that {ck.path} was trained on does not exist here: "
                             "pass its current location with --store PATH")
        key = str(Path(path).resolve())
        if key not in stores:
            stores[key] = open_store(path)
        store = stores[key]
        check_store(ck, store)
        group = groups.setdefault((key, rec["layer"]), Group(store, rec["layer"], []))
        group.checkpoints.append(ck)
    return list(groups.values())


def check_store(ck: Checkpoint, store: Store) -> None:
    """Refuse a store that is not the one the checkpoint was trained on (layer, width, identity)."""
    rec = ck.meta["store"]
    layer = rec.get("layer")
    if layer not in store.layer_names:
        raise StoreError(f"{store.path} has no layer '{layer}' (it has {', '.join(store.layer_names)}), which "
                         f"{ck.path} was trained on: pass the right store with --store")
    d = store.layer(layer).d
    if d != int(ck.config["d_in"]) or d != int(rec.get("d", d)):
        raise StoreError(f"{store.path} layer '{layer}' has width {d} but {ck.path} expects {ck.config['d_in']}: "
                         "it is another backbone or layer; pass the store the checkpoint was trained on")
    if rec.get("fingerprint") != store.fingerprint:
        raise StoreError(f"{store.path} is not the store {ck.path} was trained on (store fingerprint "
                         f"{store.fingerprint[:19]}... vs {str(rec.get('fingerprint'))[:19]}...: another backbone, "
                         "dataset or layer set): pass the matching store with --store")


def val_slots(ck: Checkpoint, n_images: int) -> np.ndarray:
    raw = ck.meta["split"].get("val_slots")
    slots = np.asarray(raw.cpu() if isinstance(raw, torch.Tensor) else (raw if raw is not None else []),
                       dtype=np.int64).reshape(-1)
    if slots.size == 0:
        raise UserError(f"{ck.path} has an empty held-out split (no val_slots): retrain with a validation "
                        "fraction above 0, or there is nothing unseen to evaluate on")
    if slots.min() < 0 or slots.max() >= n_images:
        raise CheckpointError(f"{ck.path} lists held-out slots outside 0..{n_images - 1}: it belongs to another store")
    return np.unique(slots)


def eval_slots(group: Group, max_images: int | None, seed: int) -> np.ndarray:
    """Held-out, valid images common to every checkpoint of the group (sorted), capped by max_images."""
    store = group.store
    common = None
    for ck in group.checkpoints:
        s = val_slots(ck, store.n_images)
        common = s if common is None else np.intersect1d(common, s)
    slots = common[store.valid[common]]
    if slots.size == 0:
        names = ", ".join(str(c.path) for c in group.checkpoints)
        raise UserError(f"no valid held-out image is common to {names}: evaluate them separately")
    return _subsample(slots, max_images, seed)


def probe_train_slots(group: Group, held_out: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Labelled, valid images outside every held-out set, for fitting the probes (sorted, capped)."""
    store = group.store
    use = store.valid & (store.labels >= 0)
    for ck in group.checkpoints:
        use[val_slots(ck, store.n_images)] = False
    use[held_out] = False
    return _subsample(np.nonzero(use)[0], cap, seed + 1)


def _subsample(slots: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    if cap is None or slots.size <= cap:
        return slots
    return np.sort(np.random.default_rng(seed).choice(slots, size=cap, replace=False))
