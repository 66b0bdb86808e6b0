"""index.html: for a sample of latents, their top-activating images beside MS, purity and firing rate.

The sample is a seeded random draw of live latents (``html_latents`` per checkpoint, shown in
index order), so the page shows typical latents rather than the best ones. Thumbnails are written
once per image under ``thumbs/`` and linked; where the dataset cannot be re-read, the page says why.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from visionsae.evaluate.thumbs import ThumbnailSource

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.figs img { max-width: 32%; margin-right: 1%; }
.latent { display: flex; align-items: flex-start; border-top: 1px solid #eee; padding: 6px 0; }
.stats { width: 15em; flex: none; font-size: 13px; line-height: 1.4; }
.stats b { font-size: 15px; }
.imgs { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; text-align: center; font-size: 11px; }
figure img { display: block; image-rendering: pixelated; border: 1px solid #ccc; }
.missing { color: #a33; font-style: italic; font-size: 13px; }
"""


def sample_latents(firing_rate_N: np.ndarray, n: int, seed: int) -> np.ndarray:
    live = np.nonzero(firing_rate_N > 0)[0]
    if live.size <= n:
        return live
    return np.sort(np.random.default_rng(seed).choice(live, size=n, replace=False))


def _num(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def write_html(result, out: Path, figures: dict[str, str]) -> Path:
    cfg = result.config
    thumbs_dir = out / "thumbs"
    sources = [ThumbnailSource(g.store.dataset, cfg.thumb_size) for g in result.groups]
    written: dict[tuple[int, int], str | None] = {}

    def thumb(group: int, slot: int) -> str | None:
        """Relative path of the slot's thumbnail, written on first use; None if unreadable."""
        index = int(result.groups[group].store.image_index[slot])
        if (group, index) not in written:
            data = sources[group].png(index)
            name = None
            if data is not None:
                thumbs_dir.mkdir(exist_ok=True)
                name = f"thumbs/g{group}-{index}.png"
                (out / name).write_bytes(data)
            written[(group, index)] = name
        return written[(group, index)]

    body = ["<h1>SAE evaluation: latents and their top images</h1>",
            "<p>For each checkpoint, a random sample of live latents (seed "
            f"{cfg.seed}); for each latent, its {cfg.html_images} top-activating held-out images with the "
            "activation and class. MS: Monosemanticity Score; purity: share of the most frequent class among its "
            "top images / all firing images; rate: share of held-out rows where it fires. "
            "Every number: <a href='report.json'>report.json</a>, the table: <a href='report.md'>report.md</a>.</p>"]
    if figures:
        body.append("<div class='figs'>" + "".join(f"<img src='{html.escape(f)}' alt='{html.escape(k)}'>"
                                                   for k, f in figures.items()) + "</div>")
    for ck in result.checkpoints:
        group = result.groups[ck.group]
        store, t, s = group.store, ck.tables, ck.summary
        classes = store.classes
        body.append(f"<h2 class='checkpoint'>{html.escape(ck.name)}</h2>")
        body.append(f"<p>{html.escape(ck.path)}: {html.escape(s['config']['arch'])}, {s['config']['n_latents']} "
                    f"latents, k = {s['config']['k']}, layer {html.escape(group.layer)}; FVU "
                    f"{_num(s['reconstruction']['fvu'], 4)}, L0 {_num(s['sparsity']['l0'], 1)}, "
                    f"{s['sparsity']['dead']} dead, MS mean {_num(s['monosemanticity']['mean'])}.</p>")
        if sources[ck.group].unavailable:
            body.append(f"<p class='missing'>No thumbnails: {html.escape(sources[ck.group].unavailable)}.</p>")
        for lat in sample_latents(t.firing_rate_N, cfg.html_latents, cfg.seed):
            top_cls = int(t.top_class_N[lat])
            cls_name = (classes[top_cls] if 0 <= top_cls < len(classes) else str(top_cls)) if top_cls >= 0 else "–"
            stats = (f"<b>latent {lat}</b><br>MS {_num(t.ms_N[lat])}<br>purity {_num(t.purity_top_N[lat])} top / "
                     f"{_num(t.purity_all_N[lat])} all<br>rate {t.firing_rate_N[lat]:.2e} of rows<br>"
                     f"{100 * t.image_rate_N[lat]:.2f}% of images<br>top class: {html.escape(cls_name)}")
            figs = []
            for val, slot in zip(t.top_vals_NM[lat, :cfg.html_images], t.top_slots_NM[lat, :cfg.html_images]):
                if not val > 0:
                    break
                label = int(store.labels[slot])
                caption = f"{val:.3g}" + (f"<br>{html.escape(classes[label] if label < len(classes) else str(label))}"
                                          if label >= 0 else "")
                src = thumb(ck.group, int(slot)) if not sources[ck.group].unavailable else None
                if src is None:  # the page already says why when the whole dataset is unavailable
                    why = "" if sources[ck.group].unavailable else " could not be read"
                    img = (f"<div class='missing' style='width:{cfg.thumb_size}px'>image "
                           f"{int(store.image_index[slot])}{why}</div>")
                else:
                    img = f"<img src='{src}' width='{cfg.thumb_size}' alt='image {int(store.image_index[slot])}'>"
                figs.append(f"<figure class='thumb'>{img}<figcaption>{caption}</figcaption></figure>")
            body.append(f"<div class='latent' data-latent='{lat}'><div class='stats'>{stats}</div>"
                        f"<div class='imgs'>{''.join(figs)}</div></div>")
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>SAE evaluation</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
