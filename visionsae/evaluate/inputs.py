"""What an evaluation reads: checkpoints, the store each was trained on, the images to use.

Every mismatch between a checkpoint and a store is a one-line error here, before any work:
a missing store, another layer, another width, another backbone (store and layer fingerprints), an
empty held-out split. A store with the checkpoint's layer fingerprint but another store fingerprint
is a sibling (the same backbone and layer over other images, e.g. the test split): all its images
are unseen. Checkpoints that share store and layer form a group, evaluated in one pass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionsae.errors import CheckpointError, StoreError, UserError
from visionsae.runs import checkpoints_of
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
    """Checkpoints of one store layer: one pass over its images serves them all.

    ``sibling`` is False when ``store`` is the store the checkpoints were trained on: they are evaluated on
    their held-out images, and the probes train on the rest of it (``probe_store`` is ``store``). It is True
    when ``store`` is another store of the same backbone and layer (another split, e.g. test after training
    on train; same layer fingerprint): every valid image of it is unseen, so all of them are evaluated on, and
    the probes train on ``probe_store``, the training store, outside the held-out images. ``probe_store`` is
    None when that store is not here or labels another dataset; ``probe_skip`` says why.
    """

    store: Store
    layer: str
    checkpoints: list[Checkpoint]
    sibling: bool = False
    probe_store: Store | None = None
    probe_skip: str | None = None


def load_checkpoints(paths: list[str], device: torch.device) -> list[Checkpoint]:
    """Checkpoints, or run directories of sae-train (each stands for the final checkpoints of its runs)."""
    out = []
    for p in [str(c) for given in paths for c in checkpoints_of(given)]:
        model, meta = load_checkpoint(p, device)
        for key in ("config", "store", "split"):
            if not isinstance(meta.get(key), dict):
                raise CheckpointError(f"{p} lacks its '{key}' record: it was not written by sae-train")
        out.append(Checkpoint(Path(p), "", model, meta))
    for ck, name in zip(out, _short_names([c.path for c in out])):
        ck.name = name
    return out


def _short_names(paths: list[Path]) -> list[str]:
    """'runs/clip/topk-k32-none/ckpt.pt' -> 'topk-k32-none' (the run's name, run_layout.md); the full path where
    the short names would collide."""
    short = [(p.parent.name or p.stem) if p.name == "ckpt.pt" else p.stem for p in paths]
    return short if len(set(short)) == len(short) else [str(p) for p in paths]


def group_checkpoints(checkpoints: list[Checkpoint], store_override: str | None) -> list[Group]:
    stores: dict[str, Store] = {}

    def opened(path: str) -> tuple[str, Store]:
        key = str(Path(path).resolve())
        if key not in stores:
            stores[key] = open_store(path)
        return key, stores[key]

    groups: dict[tuple, Group] = {}
    for ck in checkpoints:
        rec = ck.meta["store"]
        path = store_override or rec.get("path")
        if not path:
            raise CheckpointError(f"{ck.path} records no store path: pass the store it was trained on with --store")
        if not Path(path).exists():
            raise StoreError(f"the store {path} that {ck.path} was trained on does not exist here: "
                             "pass its current location with --store PATH")
        key, store = opened(path)
        sibling = check_store(ck, store)
        probe_key, probe_store, probe_skip = (_training_store(ck, store, opened) if sibling
                                              else (key, store, None))
        group = groups.setdefault((key, rec["layer"], sibling, probe_key),
                                  Group(store, rec["layer"], [], sibling, probe_store, probe_skip))
        group.checkpoints.append(ck)
    return list(groups.values())


def check_store(ck: Checkpoint, store: Store) -> bool:
    """Refuse a store that holds other activations than the checkpoint was trained on (layer, width, backbone).

    Returns False for the training store itself (same store fingerprint), True for a sibling: a store of the
    same backbone, preprocessing, tokens and layer over other images (same layer fingerprint).
    """
    rec = ck.meta["store"]
    layer = rec.get("layer")
    if layer not in store.layer_names:
        raise StoreError(f"{store.path} has no layer '{layer}' (it has {', '.join(store.layer_names)}), which "
                         f"{ck.path} was trained on: pass the right store with --store")
    d = store.layer(layer).d
    if d != int(ck.config["d_in"]) or d != int(rec.get("d", d)):
        raise StoreError(f"{store.path} layer '{layer}' has width {d} but {ck.path} expects {ck.config['d_in']}: "
                         "it is another backbone or layer; pass the store the checkpoint was trained on")
    if rec.get("fingerprint") == store.fingerprint:
        return False
    mine = store.layer_fingerprint(layer)
    if mine is not None and rec.get("layer_fingerprint") == mine:
        return True
    if "layer_fingerprint" not in rec:
        why = "the checkpoint predates layer fingerprints, so only its own store is accepted; retrain to get one"
    elif rec["layer_fingerprint"] is None:
        why = "its training store records no backbone fingerprint, so only that store is accepted"
    else:
        why = "another backbone, preprocessing, token selection or layer"
    raise StoreError(f"{store.path} does not hold the activations {ck.path} was trained on (store fingerprint "
                     f"{store.fingerprint[:19]}... vs {str(rec.get('fingerprint'))[:19]}...; {why}): pass the "
                     "training store, or a store extracted with the same backbone and settings, with --store")


def _training_store(ck: Checkpoint, store: Store, opened) -> tuple[str | None, Store | None, str | None]:
    """The store a sibling group's probes train on: the checkpoint's training store, if it is here and labels
    the same classes. Returns (key, store, None) or (None, None, why the probes are skipped)."""
    rec = ck.meta["store"]
    path = rec.get("path")
    if not path or not Path(path).exists():
        return None, None, (f"the training store {path} is not here, and the probes train on its images: "
                            "evaluate where it is, or on the training store itself")
    key, train = opened(path)
    if train.fingerprint != rec.get("fingerprint"):
        return None, None, f"{path} has changed since training (store fingerprint differs)"
    same = ("id", "classes")
    if any(train.dataset.get(k) != store.dataset.get(k) for k in same):
        return None, None, (f"the training store {path} holds dataset '{train.dataset.get('id')}' and "
                            f"{store.path} '{store.dataset.get('id')}': their labels do not match")
    return key, train, None


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
    """The images evaluated on (sorted, capped by max_images): the valid held-out images common to every
    checkpoint of the group, or, on a sibling store, every valid image."""
    store = group.store
    if group.sibling:
        store.verify()  # every image of it is a candidate: each shard's valid flags decide
        slots = np.nonzero(store.valid)[0]
        if slots.size == 0:
            raise UserError(f"{store.path} has no valid image to evaluate on")
        return _subsample(slots, max_images, seed)
    common = None
    for ck in group.checkpoints:
        s = val_slots(ck, store.n_images)
        common = s if common is None else np.intersect1d(common, s)
    verify_slots(store, common)  # their valid flags decide which are used
    slots = common[store.valid[common]]
    if slots.size == 0:
        names = ", ".join(str(c.path) for c in group.checkpoints)
        raise UserError(f"no valid held-out image is common to {names}: evaluate them separately")
    return _subsample(slots, max_images, seed)


def verify_slots(store: Store, slots: np.ndarray) -> None:
    """Check the checksums of every shard holding one of ``slots`` (all its chunks: rows, labels, index,
    valid) before anything of them is used; a shard is checked once per opened store."""
    slots = np.asarray(slots, dtype=np.int64)
    for shard in np.unique(slots // store.images_per_shard):
        store.verify_shard(int(shard))


def probe_train_slots(group: Group, held_out: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Labelled, valid images of ``group.probe_store`` outside every held-out set, for fitting the probes
    (sorted, capped); empty when the group has no probe store."""
    store = group.probe_store
    if store is None:
        return np.zeros(0, dtype=np.int64)
    use = store.valid & (store.labels >= 0)
    for ck in group.checkpoints:
        use[val_slots(ck, store.n_images)] = False
    if not group.sibling:
        use[held_out] = False
    slots = _subsample(np.nonzero(use)[0], cap, seed + 1)
    verify_slots(store, slots)
    return slots


def _subsample(slots: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    if cap is None or slots.size <= cap:
        return slots
    return np.sort(np.random.default_rng(seed).choice(slots, size=cap, replace=False))
