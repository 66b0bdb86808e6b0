"""One evaluation: every checkpoint of a store layer measured on one pass over its held-out images.

``evaluate(cfg)`` computes and returns the results; ``run(cfg)`` also writes the report directory.
Per group of checkpoints (same store and layer) the data is read twice at most: the probe-training
images once (their codes and raw vectors, only when the store has labels and probe budgets were
asked for; the raw probe is fitted on them), then the held-out images once (all metrics, for all
checkpoints, and the raw probe's score).

Memory is bounded by latents, batch and settings, never by the rows (config.eval_memory has the
terms, checked before any pass): every metric is a running sum or a per-latent table, and the one
thing kept per held-out image, its top codes for the probes, goes to a temporary file (TMPDIR).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from visionsae.errors import UserError
from visionsae.evaluate import probes
from visionsae.evaluate.config import EvalConfig, GroupShape, check_memory
from visionsae.evaluate.embeddings import OtherEmbeddings, image_vectors
from visionsae.evaluate.inputs import Group, eval_slots, group_checkpoints, load_checkpoints, probe_train_slots
from visionsae.evaluate.model_eval import LatentTables, ModelEval
from visionsae.device import resolve_device
from visionsae.store import Store


@dataclasses.dataclass
class CheckpointResult:
    name: str
    path: str
    summary: dict  # JSON-able: config, metrics, per-latent lists
    tables: LatentTables
    group: int  # index into EvalResult.groups


@dataclasses.dataclass
class GroupInfo:
    store: Store
    layer: str
    summary: dict  # JSON-able description of the data evaluated on


@dataclasses.dataclass
class EvalResult:
    config: EvalConfig
    groups: list[GroupInfo]
    checkpoints: list[CheckpointResult]


def run(cfg: EvalConfig) -> EvalResult:
    """Evaluate, then write report.json, report.md, the plots and index.html under ``cfg.out``."""
    from visionsae.evaluate.report import open_report_dir, write_report
    cfg.validate()
    lock = open_report_dir(Path(cfg.out))  # before any work: a bad --out fails now, not after the evaluation
    try:
        result = evaluate(cfg)
        write_report(result, Path(cfg.out))
    finally:
        lock.release()
    return result


def evaluate(cfg: EvalConfig) -> EvalResult:
    cfg.validate()
    device = resolve_device(cfg.device)
    checkpoints = load_checkpoints(cfg.checkpoints, device)
    groups = group_checkpoints(checkpoints, cfg.store)
    others = [_other_embeddings(group, cfg) for group in groups]
    memory = _device_memory(device)
    # Once before any shard is verified (the settings alone: a wrong --batch-rows is refused at once), and
    # again with the class counts, read from labels only after their shards' checksums are checked.
    check_memory(cfg, [_shape(group, other, cfg, 0) for group, other in zip(groups, others)], *memory)
    images = [_select_images(group, other, cfg) for group, other in zip(groups, others)]
    check_memory(cfg, [_shape(group, other, cfg) for group, other in zip(groups, others)], *memory)
    infos, results = [], []
    for g, (group, im) in enumerate(zip(groups, images)):
        info, res = _evaluate_group(group, im, g, cfg, device)
        infos.append(info)
        results.extend(res)
    order = {str(Path(p)): i for i, p in enumerate(cfg.checkpoints)}
    results.sort(key=lambda r: order.get(r.path, len(order)))
    return EvalResult(cfg, infos, results)


def _device_memory(device: torch.device) -> tuple[int, str, int | None]:
    """(device bytes, its name, host bytes or None where the device is the host)."""
    import os
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"the GPU {device}", host
    return host, "this machine's memory", None


def _shape(group: Group, other: OtherEmbeddings | None, cfg: EvalConfig, n_classes: int | None = None
           ) -> GroupShape:
    """What the group's tables are sized by; the probe-training images at their cap; the classes from the
    store's labels unless given."""
    info = group.store.layer(group.layer)
    probing = bool(cfg.probe_budgets) and group.probe_store is not None
    cap = min(cfg.probe_train_images, cfg.max_images or cfg.probe_train_images)
    if n_classes is None:
        n_classes = _n_classes(group.store, group.probe_store)
    return GroupShape(n_latents=[int(ck.config["n_latents"]) for ck in group.checkpoints],
                      softk=[ck.config.get("arch") == "softk" for ck in group.checkpoints], d=info.d,
                      tokens=info.tokens_per_image, n_classes=n_classes,
                      d_embed=other.d if other else info.d,
                      probe_train=cap if probing else 0,
                      embed_tokens=other.info.tokens_per_image if other else 0)


@dataclasses.dataclass
class _Images:
    """Which images a group is evaluated on."""

    held_out: np.ndarray  # store slots, sorted
    other: OtherEmbeddings | None  # --ms-embeddings
    other_slots: np.ndarray | None  # the held-out images' slots in that store
    n_no_embedding: int
    probe_train: np.ndarray  # store slots, sorted
    probe_skip: str | None  # why there are no probes, or None


def _other_embeddings(group: Group, cfg: EvalConfig) -> OtherEmbeddings | None:
    """The group's --ms-embeddings store (None: its own layer), after the checks that need no image."""
    store, info = group.store, group.store.layer(group.layer)
    if cfg.image_pooling == "cls" and info.tokens_per_image > 1 and info.token_kind != "all":
        raise UserError(f"--image-pooling cls reads each image's class token, but layer '{group.layer}' of "
                        f"{store.path} holds '{info.token_kind}' tokens: extract with --tokens all, or use max")
    return OtherEmbeddings(cfg.ms_embeddings, cfg.ms_embeddings_layer, store) if cfg.ms_embeddings else None


def _select_images(group: Group, other: OtherEmbeddings | None, cfg: EvalConfig) -> _Images:
    store = group.store
    slots = eval_slots(group, cfg.max_images, cfg.seed)
    other_slots, n_no_embedding = None, 0
    if other is not None:
        other_slots = other.slots_for(store.image_index[slots])
        keep = other_slots >= 0
        n_no_embedding = int((~keep).sum())
        slots, other_slots = slots[keep], other_slots[keep]
        if slots.size == 0:
            raise UserError(f"none of the held-out images has a valid row in --ms-embeddings {cfg.ms_embeddings}: "
                            "extract the same images with the other backbone")
    cap = min(cfg.probe_train_images, cfg.max_images or cfg.probe_train_images)
    train = probe_train_slots(group, slots, cap, cfg.seed)
    y_eval = store.labels[slots]
    skip = ("no --probe-budgets given" if not cfg.probe_budgets else group.probe_skip
            or probes.check_labels(group.probe_store.labels[train], y_eval[y_eval >= 0]))
    return _Images(slots, other, other_slots, n_no_embedding, train, skip)


def _batches(n: int, size: int, desc: str, show: bool) -> Iterator[slice]:
    for pos in tqdm(range(0, n, size), desc=desc, unit="batch", disable=not show):
        yield slice(pos, pos + size)


def _n_classes(*stores: Store | None) -> int:
    n = 0
    for store in filter(None, stores):
        labelled = store.labels[store.labels >= 0]
        n = max(n, len(store.classes), int(labelled.max()) + 1 if labelled.size else 0)
    return n


def _evaluate_group(group: Group, im: _Images, index: int, cfg: EvalConfig, device: torch.device
                    ) -> tuple[GroupInfo, list[CheckpointResult]]:
    store, info, probe_src = group.store, group.store.layer(group.layer), group.probe_store
    T = info.tokens_per_image
    budgets = sorted(cfg.probe_budgets)
    n_classes = _n_classes(store, probe_src)
    probing = im.probe_skip is None
    per_batch = max(1, cfg.batch_rows // T)
    name = f"{Path(store.path).name}/{group.layer}"
    with tempfile.TemporaryDirectory(prefix="sae-eval-codes-") as spill:
        evals = [ModelEval(ck, info, im.other.d if im.other else info.d, n_classes, tuple(cfg.k_sweep),
                           max(budgets, default=1), cfg.top_images, device, cfg.image_pooling, probing,
                           Path(spill) / f"c{i}")
                 for i, ck in enumerate(group.checkpoints)]
        y_eval = store.labels[im.held_out]
        raw_score = None
        if probing:
            # The probe-training images first (at most probe_train_images of them): the raw-activation probe is
            # then fitted before the held-out pass, which scores it batch by batch instead of keeping every
            # held-out image's vector (d floats per image).
            raw_train = []
            for part in _batches(len(im.probe_train), per_batch, f"{name} probe-train", cfg.progress):
                x_RD = torch.from_numpy(probe_src.read_slots(group.layer, im.probe_train[part])).to(device)
                raw_train.append(image_vectors(x_RD, T, info.token_kind).cpu().numpy())
                for ev in evals:
                    ev.update_train(x_RD)
            y_train = probe_src.labels[im.probe_train]
            raw_score = probes.StreamedScore(*probes.fit(np.concatenate(raw_train), y_train, cfg.seed))
            del raw_train

        # One pass over the held-out images serves every checkpoint and every metric.
        for part in _batches(len(im.held_out), per_batch, f"{name} held-out", cfg.progress):
            batch = im.held_out[part]
            x_RD = torch.from_numpy(store.read_slots(group.layer, batch)).to(device)
            img_ID = image_vectors(x_RD, T, info.token_kind)
            e_IE = (torch.from_numpy(im.other.vectors(im.other_slots[part], cfg.batch_rows)).to(device) if im.other
                    else img_ID)
            if raw_score is not None:
                raw_score.update(img_ID.cpu().numpy(), y_eval[part])
            slots_I, labels_I = torch.from_numpy(batch).to(device), torch.from_numpy(y_eval[part]).to(device)
            for ev in evals:
                ev.update_eval(x_RD, e_IE, slots_I, labels_I)

        test = y_eval >= 0
        if probing:
            raw = raw_score.result()
            chance = probes.chance_accuracy(y_train, y_eval[test])
        results = []
        for ev in evals:
            summary, tables = ev.finish(store.labels)
            if probing:
                accs = probes.run_probes(ev.codes_train.result(), y_train, ev.codes_eval.result(), y_eval,
                                         budgets, ev.n_latents, cfg.seed)
                ev.codes_eval.close()
                summary["probes"] = {"budgets": {str(m): v for m, v in accs.items()}, "raw": raw, "chance": chance,
                                     "n_train": int(im.probe_train.size), "n_test": int(test.sum())}
            else:
                summary["probes"] = {"skipped": im.probe_skip}
            ck = ev.ck
            summary = {"name": ck.name, "path": str(ck.path), "config": ck.config, "train": ck.meta.get("train"),
                       "step": ck.meta.get("step"), "train_metrics": ck.meta.get("metrics"), "layer": group.layer,
                       **summary, "latents": _latent_lists(tables)}
            results.append(CheckpointResult(ck.name, str(ck.path), summary, tables, index))
    return GroupInfo(store, group.layer, _group_summary(group, im, cfg)), results


def _group_summary(group: Group, im: _Images, cfg: EvalConfig) -> dict:
    store, info = group.store, group.store.layer(group.layer)
    T = info.tokens_per_image
    return {
        "store": {"path": str(store.path), "fingerprint": store.fingerprint, "format": store.format,
                  "backbone": store.backbone, "dataset": {k: v for k, v in store.dataset.items() if k != "classes"},
                  "n_classes": _n_classes(store, group.probe_store)},
        "layer": {"name": info.name, "kind": info.kind, "d": info.d, "tokens_per_image": T,
                  "token_kind": info.token_kind, "dtype": info.dtype},
        "evaluated_on": (f"every valid image of {store.path}, a store of the same backbone and layer as the "
                         "training store (no image of it was trained on)" if group.sibling
                         else "the images every checkpoint held out from training"),
        "held_out_images": int(im.held_out.size), "held_out_rows": int(im.held_out.size * T),
        "probe_train_images": int(im.probe_train.size) if im.probe_skip is None else 0,
        "probe_train_store": str(group.probe_store.path) if group.probe_store is not None else None,
        "ms_embeddings": im.other.label if im.other else f"the evaluated layer's image-level vectors ({info.name})",
        "ms_encoder": (f"{im.other.store.backbone.get('id')}/{im.other.layer}" if im.other
                       else f"own layer ({info.name})"),
        "images_without_embedding": im.n_no_embedding,
        "pooling": (None if T == 1 else "per-image activation of a latent = its activation on the class token "
                    "(--image-pooling cls)" if cfg.image_pooling == "cls" else "per-image activation of a latent = "
                    "its maximum over the image's tokens (--image-pooling cls: its class-token activation)"),
        "checkpoints": [str(ck.path) for ck in group.checkpoints],
    }


def _latent_lists(t: LatentTables) -> dict:
    return {"firing_rate": t.firing_rate_N.tolist(), "image_rate": t.image_rate_N.tolist(),
            "ms": t.ms_N.tolist(), "purity_top": t.purity_top_N.tolist(), "purity_all": t.purity_all_N.tolist(),
            "top_class": t.top_class_N.tolist()}
