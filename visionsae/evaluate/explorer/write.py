"""The latent explorer: static files that open from file:// (no server, no network).

    index.html                       the page; loads explorer/app.js, app.css and data/meta.js
    explorer/data/meta.js            checkpoints, class names, summary figures (small)
    explorer/data/c<i>/table.js      checkpoint i: one column per per-latent statistic (every latent)
    explorer/data/c<i>/l<j>.js       checkpoint i: details of latents j*CHUNK .. (j+1)*CHUNK-1
    thumbs/g<group>-<index>.png      one thumbnail per image, shared by every latent that shows it

Data files are JavaScript (``VSAE.table(...)``, ``VSAE.chunk(...)``) and are added as <script> elements
when needed: browsers refuse fetch() of file:// URLs, but not scripts. So the page loads the table of
the checkpoint shown and then only the chunks of the latents opened.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

from visionsae.evaluate.explorer import compute
from visionsae.device import resolve_device
from visionsae.evaluate.latent_stats import BINS_PER_OCTAVE, LOW_OCTAVE
from visionsae.evaluate.thumbs import ThumbnailSource
from visionsae.sae import load_checkpoint

CHUNK = 64  # latents per detail file
NEIGHBOURS = 8  # nearest latents by decoder cosine
CLASS_EFFECTS = 6  # promoted / suppressed classes shown
ABLATED_IMAGES = 8  # top images whose logits are recomputed without the latent
BANDS = 4  # activation-quantile bands of the sampled firing images
PER_BAND = 4
STATIC = ("app.js", "app.css")


def _g(v) -> float | None:
    """4 significant digits, or None for NaN / inf (strict JSON)."""
    v = float(v)
    return float(f"{v:.4g}") if math.isfinite(v) else None


def _col(a: np.ndarray) -> list:
    """``_g`` of every value, vectorised (a million values take seconds one by one): the rounded value is an
    integer times an exact power of ten, so its shortest repr has at most 4 significant digits."""
    a = np.asarray(a, dtype=np.float64).copy()
    ok = np.isfinite(a) & (a != 0)
    exp = np.floor(np.log10(np.abs(a[ok]))) - 3
    up = exp >= 0
    vals = a[ok]
    vals[up] = np.round(vals[up] / 10.0 ** exp[up]) * 10.0 ** exp[up]
    vals[~up] = np.round(vals[~up] * 10.0 ** -exp[~up]) / 10.0 ** -exp[~up]
    a[ok] = vals
    out = a.tolist()
    if not np.isfinite(a).all():
        out = [v if math.isfinite(v) else None for v in out]
    return out


def _per_row(i_NJ: np.ndarray, v_NJ: np.ndarray) -> list[list[list]]:
    """[[i, v], ...] per row: a latent's nearest latents, classes, ..."""
    J = i_NJ.shape[1]
    vals = _col(np.asarray(v_NJ).ravel())
    return [[[a, vals[n * J + j]] for j, a in enumerate(row)] for n, row in enumerate(i_NJ.tolist())]


def _js(path: Path, call: str, *args) -> int:
    text = f"{call}(" + ",".join(json.dumps(a, separators=(",", ":"), allow_nan=False) for a in args) + ");\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return len(text)


class _Thumbs:
    """Writes each group's thumbnails once; remembers which images have none."""

    def __init__(self, result, out: Path):
        self.out, self.size = out, result.config.thumb_size
        self.sources = [ThumbnailSource(g.store.dataset, self.size, (g.store.backbone or {}).get("preprocessing"))
                        for g in result.groups]
        self.done: set[tuple[int, int]] = set()

    def write(self, group: int, indices: np.ndarray) -> None:
        if self.sources[group].unavailable:
            return
        for index in np.unique(indices).tolist():
            if (group, index) in self.done:
                continue
            self.done.add((group, index))
            data = self.sources[group].png(index)
            if data is not None:
                (self.out / "thumbs").mkdir(exist_ok=True)
                (self.out / "thumbs" / f"g{group}-{index}.png").write_bytes(data)


def write_explorer(result, out: Path, figures: dict[str, str]) -> Path:
    cfg = result.config
    device = resolve_device(cfg.device)
    root = out / "explorer"
    if (root / "data").exists():
        shutil.rmtree(root / "data")  # a report's data is replaced as a whole
    root.mkdir(parents=True, exist_ok=True)
    for name in STATIC:
        (root / name).write_text(resources.files(__package__).joinpath("static", name).read_text("utf-8"), "utf-8")
    thumbs = _Thumbs(result, out)
    heads = [g.store.head() for g in result.groups]
    groups_meta = []
    for gi, g in enumerate(result.groups):
        info = g.store.layer(g.layer)
        names = g.store.class_names
        n_cls = max(len(names), int(g.store.labels.max(initial=-1)) + 1)
        head = heads[gi] if compute.head_applies(heads[gi], info.kind, info.d, info.tokens_per_image) else None
        grid = compute.patch_grid(info.tokens_per_image, info.token_kind)
        groups_meta.append({
            "store": str(g.store.path), "layer": g.layer, "backbone": g.store.backbone.get("id"),
            "weights": g.store.backbone.get("weights"),
            "dataset": {k: g.store.dataset.get(k) for k in ("id", "split", "n_images")},
            "classes": [names[c] if c < len(names) else str(c) for c in range(n_cls)],
            "head_classes": head.classes if head is not None else None,
            "tokens": info.tokens_per_image, "token_kind": info.token_kind, "grid": grid,
            "thumbs": thumbs.sources[gi].unavailable, "thumb_size": cfg.thumb_size,
            "held_out": g.summary.get("held_out_images"),
            "ms_encoder": g.summary.get("ms_encoder")})
    models, dirs = {}, {}
    for i, ck in enumerate(result.checkpoints):
        models[i], _ = load_checkpoint(ck.path, device)
        models[i].eval()
        dirs[i] = compute.decoder_directions(models[i], int(ck.summary["config"]["n_latents"]), device)
    matches: dict[int, dict[int, compute.Match]] = {i: {} for i in dirs}
    for i in dirs:
        for j in dirs:
            same = result.checkpoints[i].group == result.checkpoints[j].group
            if i < j and same and dirs[i].shape[1] == dirs[j].shape[1]:
                matches[i][j], matches[j][i] = compute.match(dirs[i], dirs[j])
    cks_meta = []
    for i, ck in enumerate(result.checkpoints):
        gm = groups_meta[ck.group]
        head = heads[ck.group] if gm["head_classes"] is not None else None
        n_chunks = _write_checkpoint(i, ck, result.groups[ck.group], models[i], dirs[i], head, matches[i], gm,
                                     thumbs, root / "data" / f"c{i}", cfg, device)
        s = ck.summary
        cks_meta.append({"name": ck.name, "path": ck.path, "group": ck.group, "arch": s["config"]["arch"],
                         "k": s["config"]["k"], "n_latents": s["config"]["n_latents"],
                         "fvu": _g(s["reconstruction"]["fvu"]), "l0": _g(s["sparsity"]["l0"]),
                         "dead": s["sparsity"]["dead"], "ms": _g(s["monosemanticity"]["mean"]),
                         "chunks": n_chunks, "matches": sorted(matches[i])})
    meta = {"title": "SAE latent explorer", "chunk": CHUNK, "hist": {"low_octave": LOW_OCTAVE,
                                                                      "per_octave": BINS_PER_OCTAVE},
            "groups": groups_meta, "checkpoints": cks_meta, "figures": figures,
            "top_images": cfg.top_images}
    _js(root / "data" / "meta.js", "VSAE.setMeta", meta)
    page = out / "index.html"
    page.write_text(_PAGE, encoding="utf-8")
    return page


def _write_checkpoint(i, ck, group, model, dirs_ND, head, matches, gm, thumbs: _Thumbs, folder: Path, cfg,
                      device) -> int:
    t, ex = ck.tables, ck.tables.extras
    store, layer = group.store, group.layer
    N = len(t.firing_rate_N)
    labels, index = store.labels, store.image_index
    mean_N = np.where(ex.n_fire_N > 0, ex.sum_act_N / np.maximum(ex.n_fire_N, 1), np.nan)
    table = {"rate": _col(t.firing_rate_N), "img": _col(t.image_rate_N), "max": _col(t.top_vals_NM[:, 0]),
             "mean": _col(mean_N), "ms": _col(t.ms_N), "pur": _col(t.purity_top_N), "pall": _col(t.purity_all_N),
             "cls": [int(c) for c in t.top_class_N]}
    if head is not None:
        up_i, up_v, dn_i, dn_v = compute.class_effects(dirs_ND, head, CLASS_EFFECTS)
        table["up"] = [int(c) for c in up_i[:, 0]]
    nb_i, nb_c = compute.nearest(dirs_ND, dirs_ND, NEIGHBOURS, same=True)

    # the (latent, image) pairs shown: top images, then a uniform sample of firing images
    S = cfg.html_images
    top_ok = (t.top_vals_NM[:, :S] > 0) & (t.top_slots_NM[:, :S] >= 0)
    top_lat, top_rank = np.nonzero(top_ok)
    top_slot = t.top_slots_NM[top_lat, top_rank]
    smp_ok = ex.sample_slots_NS >= 0
    smp_lat, smp_pos = np.nonzero(smp_ok)
    smp_slot = ex.sample_slots_NS[smp_lat, smp_pos]
    lat_P = np.concatenate([top_lat, smp_lat]).astype(np.int64)
    slot_P = np.concatenate([top_slot, smp_slot]).astype(np.int64)
    ablate_P = np.concatenate([top_rank < ABLATED_IMAGES, np.zeros(len(smp_lat), bool)]) if head is not None else None
    # token activations as uint8 levels per pair (P x T bytes): the heatmaps are uint8 anyway
    pv = compute.pair_values(model, store, layer, slot_P, lat_P, device, cfg.batch_rows, head,
                             dirs_ND if head is not None else None, ablate_P, quantised=True)
    # an image's value for a latent is what sae-eval ranked it by (max over tokens, or the class token)
    cls_pooled = cfg.image_pooling == "cls" and pv.levels_PT.shape[1] > 1
    val_P = pv.first_P if cls_pooled else pv.max_P
    # heatmaps of a latent share one scale: its largest token activation over the images shown
    heat_max_N = np.zeros(N)
    np.maximum.at(heat_max_N, lat_P, pv.max_P)
    idx_P = index[slot_P]
    vr_P = _col(val_P)
    lab_P = labels[slot_P]
    nb_rows = _per_row(nb_i, nb_c)
    if head is not None:
        up_rows, down_rows = _per_row(up_i, up_v), _per_row(dn_i, dn_v)
        logit_P, dlogit_P = _col(pv.logit_P), _col(pv.dlogit_P)

        def ablation(p: int) -> tuple:
            return (int(idx_P[p]), int(lab_P[p]), int(pv.pred_P[p]), logit_P[p], dlogit_P[p], int(pv.new_pred_P[p]))
    match_rows = {str(j): list(zip(m.idx_N.tolist(), _col(m.cos_N), m.mutual_N.tolist())) for j, m in matches.items()}
    shown_P = np.zeros(len(slot_P), dtype=bool)
    grid = gm["grid"]
    n_top = len(top_lat)
    top_bounds = np.searchsorted(top_lat, np.arange(N + 1))
    smp_bounds = np.searchsorted(smp_lat, np.arange(N + 1))
    hist_nz = ex.hist_NG > 0

    def image(p: int) -> tuple:
        shown_P[p] = True
        return int(idx_P[p]), vr_P[p], int(lab_P[p])  # [index, value, label]

    def heat(p: int, lat: int, out: dict) -> None:
        if grid is None or not heat_max_N[lat] > 0:
            return
        first = grid[0]
        # levels on the pair's scale moved to the latent's: exact on the image holding the latent's largest
        # activation (ratio 1), within one level of rint(255 a / heat_max) on the others (two roundings)
        ratio = float(pv.max_P[p]) / heat_max_N[lat]
        q = pv.levels_PT[p, first:]
        if ratio != 1.0:
            q = np.clip(np.rint(q * ratio), 0, 255).astype(np.uint8)
        out[str(int(index[slot_P[p]]))] = base64.b64encode(q.tobytes()).decode("ascii")

    folder.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-N // CHUNK)
    for c in range(n_chunks):
        records = []
        for lat in range(c * CHUNK, min((c + 1) * CHUNK, N)):
            heats: dict[str, str] = {}
            tops = list(range(top_bounds[lat], top_bounds[lat + 1]))
            rec: dict = {"top": [image(p) for p in tops]}
            for p in tops:
                heat(p, lat, heats)
            smp = np.arange(smp_bounds[lat], smp_bounds[lat + 1]) + n_top
            bands = []
            if len(smp):
                by_val = smp[np.argsort(-val_P[smp], kind="stable")]
                for b in range(BANDS):
                    lo, hi = (b * len(by_val)) // BANDS, ((b + 1) * len(by_val)) // BANDS
                    if hi <= lo:
                        continue
                    part = by_val[lo:hi]
                    m = min(PER_BAND, len(part))
                    show = part[(np.arange(m) * (len(part) - 1)) // max(m - 1, 1)]  # spread over the band
                    for p in show:
                        heat(p, lat, heats)
                    bands.append([round(100 * lo / len(by_val), 1), round(100 * hi / len(by_val), 1),
                                  vr_P[part[-1]], vr_P[part[0]], [image(int(p)) for p in show]])
            rec["bands"], rec["nsample"] = bands, int(len(smp))
            nz = np.nonzero(hist_nz[lat])[0]
            rec["hist"] = [int(nz[0])] + ex.hist_NG[lat, nz[0]:nz[-1] + 1].tolist() if len(nz) else []
            rec["cls"] = [[int(k), int(n)] for k, n in zip(ex.class_top_NJ[lat], ex.class_count_NJ[lat]) if k >= 0]
            rec["ncls"] = int(ex.class_total_N[lat])
            rec["nb"] = nb_rows[lat]
            if head is not None:
                rec["up"], rec["down"] = up_rows[lat], down_rows[lat]
                rec["abl"] = [ablation(p) for p in tops if ablate_P[p]]
            rec["m"] = {j: rows[lat] for j, rows in match_rows.items()}
            if heats:
                rec["heat"] = heats
            records.append(rec)
        _js(folder / f"l{c}.js", "VSAE.chunk", i, c, records)
    _js(folder / "table.js", "VSAE.table", i, table)
    thumbs.write(ck.group, idx_P[shown_P])
    return n_chunks


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SAE latent explorer</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="explorer/app.css">
</head><body>
<noscript><p>The explorer needs JavaScript. Every number is also in <a href="report.json">report.json</a> and
<a href="report.md">report.md</a>.</p></noscript>
<div id="app"><p class="loading">Loading&hellip;</p></div>
<script src="explorer/app.js"></script>
<script src="explorer/data/meta.js"></script>
</body></html>
"""
