"""Tables and plots of the Fashion-MNIST comparison from the test reports that experiments/fmnist.py wrote.

    python experiments/fmnist_summary.py OUT LAYER [LAYER ...]

Reads OUT/test/<layer>/report.json (every grid checkpoint on the test images), OUT/tune/<layer>/chosen.json
(the coefficients and how they were chosen), OUT/test/<layer>/softk_complexity_k*.json and OUT/times.json.
Writes OUT/summary/summary.md, summary.json and <layer>_*.png. Where a configuration was trained with
several seeds the tables give mean +- standard deviation over them.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from visionsae.evaluate.purity import MIN_FIRING_IMAGES  # noqa: E402

REGS = ("none", "off", "ratio", "both")
METHODS = ("topk/none", "topk/off", "topk/ratio", "topk/both", "softk", "batchtopk")
LABELS = {"topk/none": "Top-k", "topk/off": "Top-k + off-support l1", "topk/ratio": "Top-k + l1/l2",
          "topk/both": "Top-k + both", "softk": "SoftSAE", "batchtopk": "BatchTopK"}


def method(ck: dict) -> str:
    """topk/<reg> (topk/<reg>/relu for penalties on relu(z), the --reg-on ablation), or the arch."""
    arch, train = ck["train"]["arch"], ck["train"]
    if arch != "topk":
        return arch
    relu = train.get("reg", "none") != "none" and train.get("reg_on", "raw") == "relu"
    return f"{arch}/{train['reg']}" + ("/relu" if relu else "")


def metrics(ck: dict) -> dict[str, float]:
    """The figures the tables and plots use, from one checkpoint's report entry."""
    out = {"fvu": ck["reconstruction"]["fvu"], "l0": ck["sparsity"]["l0"],
           "dead": 100 * ck["sparsity"]["dead_fraction"], "ms": ck["monosemanticity"]["mean"],
           "purity": ck["purity"]["top"]["mean"], "l1l2": ck["sparsity"]["l1_l2_ratio"],
           "n_ms": ck["monosemanticity"]["n_latents"], "n_purity": ck["purity"]["top"]["n_latents"]}
    for kp, rec in ck["k_sweep"].items():
        out[f"fvu@{kp}"] = rec["fvu"]
    for m, rec in ck["probes"].get("budgets", {}).items():
        out[f"probe@{m}"] = rec["accuracy"]
    if "raw" in ck["probes"]:
        out["probe@raw"] = ck["probes"]["raw"]["accuracy"]
    return out


def collect(report: dict) -> dict[tuple[str, int], list[dict[str, float]]]:
    """(method, k) -> one metrics dict per seed."""
    cells = defaultdict(list)
    for ck in report["checkpoints"]:
        cells[(method(ck), ck["train"]["k"])].append(metrics(ck))
    return cells


def agg(runs: list[dict[str, float]], key: str) -> tuple[float, float, int]:
    """(mean, sample std, number of seeds) of ``key`` over the runs that have it."""
    vals = np.array([r[key] for r in runs if key in r], dtype=float)
    if len(vals) == 0:
        return float("nan"), 0.0, 0
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def fmt(runs: list[dict[str, float]], key: str, digits: int = 3) -> str:
    mean, std, n = agg(runs, key)
    if n == 0:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def layer_section(out: Path, layer: str, dest: Path) -> tuple[list[str], dict]:
    report = json.loads((out / "test" / layer / "report.json").read_text())
    chosen = json.loads((out / "tune" / layer / "chosen.json").read_text())
    cells = collect(report)
    ks = sorted({k for _, k in cells})
    group = report["groups"][0]
    lines = [f"## Layer `{layer}` (d = {group['layer']['d']}, {group['layer']['tokens_per_image']} token(s) per "
             f"image, {next(iter(report['checkpoints']))['config']['n_latents']} latents)", "",
             f"Test data: {group['held_out_images']} test images ({group['held_out_rows']} rows); probes trained on "
             f"{group['probe_train_images']} train images.", "",
             f"Coefficients, chosen on the validation images of the train split ({chosen['rule']}): "
             f"beta (off-support l1) = {chosen['beta']}, gamma (l1/l2) = {chosen['gamma']}.", ""]
    lines += table(["regularizer", "coefficient", "val FVU", "val MS", "val dead", "within FVU limit", "chosen"],
                   [[c["reg"], str(c.get("beta", c.get("gamma"))), f"{c['fvu']:.4f}", f"{c['ms']:.3f}",
                     f"{100 * c['dead_fraction']:.1f}%", "yes" if c["within_limit"] else "no",
                     "**yes**" if c["chosen"] else ""] for c in chosen["candidates"]])
    lines.append("")
    scored = f"latents firing on at least {MIN_FIRING_IMAGES} test images"
    # purity counts only labelled firing images: its count is the MS one when every test image has a label
    same_count = all(r["n_ms"] == r["n_purity"] for runs in cells.values() for r in runs)
    counts = ([("n_ms", f"Latents in the MS and purity averages ({scored})", 0)] if same_count else
              [("n_ms", f"Latents in the MS average ({scored})", 0),
               ("n_purity", f"Latents in the purity average ({scored} with a label)", 0)])
    for key, title, digits in (
            ("fvu", "FVU at the training k (lower is better)", 4),
            ("ms", f"Monosemanticity Score (e_n: {group['ms_encoder']}), mean over {scored}", 3),
            ("purity", f"Class purity of the top-50 images, mean over {scored}", 3), *counts,
            ("dead", "Dead latents on the test images (%)", 1), ("l0", "L0 (mean firing latents)", 1)):
        lines += [f"**{title}**", ""]
        lines += table(["method", *[f"k = {k}" for k in ks]],
                       [[LABELS[m], *[fmt(cells.get((m, k), []), key, digits) for k in ks]] for m in METHODS])
        lines.append("")
    sweep = sorted({int(key.split("@")[1]) for runs in cells.values() for r in runs for key in r
                    if key.startswith("fvu@")})
    for k in ks:
        lines += [f"**FVU when a model trained at k = {k} keeps k' latents**", ""]
        lines += table(["method", *[f"k' = {kp}" for kp in sweep]],
                       [[LABELS[m], *[fmt(cells.get((m, k), []), f"fvu@{kp}", 4) for kp in sweep]]
                        for m in METHODS if (m, k) in cells])
        lines.append("")
    budgets = sorted({int(key.split("@")[1]) for runs in cells.values() for r in runs for key in r
                      if key.startswith("probe@") and key != "probe@raw"})
    raw = next((r["probe@raw"] for runs in cells.values() for r in runs if "probe@raw" in r), float("nan"))
    lines += [f"**Probe accuracy on the test images with each image's m largest latents** (raw activations: "
              f"{raw:.3f})", ""]
    lines += table(["method", "k", *[f"m = {m}" for m in budgets]],
                   [[LABELS[m], str(k), *[fmt(cells[(m, k)], f"probe@{b}") for b in budgets]]
                    for k in ks for m in METHODS if (m, k) in cells])
    lines.append("")
    lines += matched_count_section(report, ks)
    lines += softk_section(out, layer, ks)
    lite2 = lite2_cells(out, layer)
    lines += reg_on_section(cells, lite2)
    lines += independent_ms_section(cells, lite2, ks)
    lines += length_section(out, layer)
    plots = plot_layer(cells, ks, sweep, budgets, layer, dest, group["ms_encoder"])
    lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    summary = {f"{m}|k={k}": {key: agg(runs, key) for key in runs[0]} for (m, k), runs in cells.items()}
    return lines, {"chosen": chosen, "cells": summary}


def matched_count_section(report: dict, ks: list[int]) -> list[str]:
    """Is a regularizer's MS / purity gain more than averaging over fewer latents? For each regularized Top-k
    model (first seed), the unregularized model's MS and purity averaged over only as many of its latents as
    the regularized model has live, taking its most frequently firing ones."""
    by_cell = {}
    for ck in sorted(report["checkpoints"], key=lambda c: c["train"]["seed"]):
        by_cell.setdefault((method(ck), ck["train"]["k"]), ck)  # the first seed of each cell
    rows = []
    for k in ks:
        base = by_cell.get(("topk/none", k))
        if base is None:
            continue
        lat = base["latents"]
        ms_N, pur_N, rate_N = (np.array(lat[key], dtype=float) for key in ("ms", "purity_top", "firing_rate"))
        live = np.isfinite(ms_N) & (rate_N > 0)
        order = np.argsort(-rate_N[live])
        for m in ("topk/off", "topk/ratio", "topk/both"):
            ck = by_cell.get((m, k))
            if ck is None:
                continue
            n = ck["monosemanticity"]["n_latents"]
            top = order[:n]
            rows.append([str(k), LABELS[m], str(n), f"{ck['monosemanticity']['mean']:.3f}",
                         f"{np.nanmean(ms_N[live][top]):.3f}", f"{base['monosemanticity']['mean']:.3f}",
                         f"{ck['purity']['top']['mean']:.3f}", f"{np.nanmean(pur_N[live][top]):.3f}"])
    if not rows:
        return []
    return ["**Same number of latents: the unregularized model restricted to its n most frequently firing live "
            "latents** (n = the regularized model's live latents; first seed)", "",
            *table(["k", "regularized model", "n", "its MS", "unregularized MS, top-n", "unregularized MS, all",
                    "its purity", "unregularized purity, top-n"], rows), ""]


def reg_on_section(cells, lite2) -> list[str]:
    """The --reg-on ablation at k = 16: penalties on |z| (the default) against relu(z)."""
    rows = []
    for reg in REGS[1:]:
        for on, m in ((r"\|z\|", f"topk/{reg}"), ("relu(z)", f"topk/{reg}/relu")):
            runs = cells.get((m, 16), [])
            if runs:
                rows.append([reg, on, fmt(runs, "fvu", 4), fmt(runs, "ms"), fmt(lite2.get((m, 16), []), "ms"),
                             fmt(runs, "purity"), fmt(runs, "dead", 1)])
    if not any(r[1] == "relu(z)" for r in rows):
        return []
    return ["**Regularizers on |z| or on relu(z) (--reg-on), Top-k at k = 16**", "",
            *table(["regularizer", "penalty on", "FVU", "MS, own layer", "MS, Lite2", "purity", "dead %"], rows), ""]


def lite2_cells(out: Path, layer: str) -> dict:
    """(method, k) -> metrics of the second evaluation, whose MS used EfficientNet-Lite2's embeddings."""
    path = out / "test" / f"{layer}-lite2" / "report.json"
    return collect(json.loads(path.read_text())) if path.exists() else {}


def independent_ms_section(cells, other, ks: list[int]) -> list[str]:
    """MS with EfficientNet-Lite2's embeddings (an independent encoder) beside MS on the layer's own vectors."""
    if not other:
        return []
    rows = [[LABELS.get(m, m), str(k), fmt(cells.get((m, k), []), "ms"), fmt(other.get((m, k), []), "ms")]
            for k in ks for m in METHODS if (m, k) in other]
    return ["**MS by encoder: the evaluated layer's own image vectors (circular) against EfficientNet-Lite2's "
            "embeddings (independent)**", "", *table(["method", "k", "MS, own layer", "MS, Lite2"], rows), ""]


def length_section(out: Path, layer: str) -> list[str]:
    """Dead latents on the validation images against training length and, where the length stage evaluated the
    same models on the test images, their MS (Lite2), purity and dead latents there."""
    path = out / "length" / layer / "dead_vs_steps.json"
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    columns = sorted({(r["steps"], r.get("seed", 0)) for r in rows})  # (steps, seed); tables before seeds: 0
    by = {(r["reg"], r["steps"], r.get("seed", 0)): r for r in rows}
    header = ["regularizer", *[f"{n} steps" + (f", seed {seed}" if seed else "") for n, seed in columns]]

    def body(cell) -> list[list[str]]:
        return [[reg, *[cell(by[(reg, *c)]) if (reg, *c) in by else "-" for c in columns]] for reg in REGS]
    lines = ["**Dead latents on the validation images against training length, Top-k k = 16** (FVU in brackets; "
             "each length a full run with its own schedule)", "",
             *table(header, body(lambda r: f"{100 * r['val_dead_frac']:.1f}% ({r['val_fvu']:.3f})")), ""]
    report = out / "test" / f"{layer}-length-lite2" / "report.json"
    if report.exists() and all("checkpoint" in r for r in rows):
        test = {Path(ck["path"]).resolve(): metrics(ck) for ck in json.loads(report.read_text())["checkpoints"]}
        for r in rows:
            r["test"] = test[Path(r["checkpoint"]).resolve()]
        lines += ["**The same models on the test images: MS (EfficientNet-Lite2 embeddings) / top-50 purity / dead "
                  "latents**", "", *table(header, body(lambda r: f"{r['test']['ms']:.3f} / {r['test']['purity']:.3f}"
                                                             f" / {r['test']['dead']:.1f}%")), ""]
    return lines


def softk_section(out: Path, layer: str, ks: list[int]) -> list[str]:
    rows = []
    for k in ks:
        path = out / "test" / layer / f"softk_complexity_k{k}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        s = r["spearman"]
        classes = list(r["k_mean_per_class"].items())
        rows.append([str(k), f"{r['k_mean']:.1f} ({r['k_q05']:.0f}-{r['k_q95']:.0f})",
                     f"{s['topk_rel_error']['rho']:+.3f}", f"{s['topk_latents_for_90pct']['rho']:+.3f}",
                     f"{s['input_norm']['rho']:+.3f}",
                     f"{classes[0][0]} {classes[0][1]:.1f} ... {classes[-1][0]} {classes[-1][1]:.1f}"])
    if not rows:
        return []
    return ["**SoftSAE's per-input k against complexity measured by the plain Top-k SAE of the same k** "
            "(Spearman correlation over test inputs)", "",
            *table(["target k", "SoftSAE k: mean (q05-q95)", "vs Top-k relative error",
                    "vs Top-k latents for 90% of z+", "vs input norm", "mean k per class: highest ... lowest"],
                   rows), ""]


def plot_layer(cells, ks, sweep, budgets, layer, dest: Path, ms_encoder: str) -> list[Path]:
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in METHODS:
        pts = [(agg(cells[(m, k)], "fvu")[0], agg(cells[(m, k)], "ms")[0], k) for k in ks if (m, k) in cells]
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[m], label=LABELS[m])
            for fvu, ms, k in pts:
                axes[0].annotate(str(k), (fvu, ms), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set(xlabel="test FVU at the training k", ylabel=f"mean MS (e_n: {ms_encoder})",
                title="MS against reconstruction (labels: k)")
    k0 = 16 if 16 in ks else ks[0]
    for m in METHODS:
        if (m, k0) in cells:
            axes[1].plot(sweep, [agg(cells[(m, k0)], f"fvu@{kp}")[0] for kp in sweep], "o-", color=colors[m],
                         label=LABELS[m])
    axes[1].axvline(k0, color="grey", lw=0.8, ls=":")
    axes[1].set(xscale="log", yscale="log", xlabel="inference-time k'", ylabel="test FVU",
                title=f"Robustness to k' (trained at k = {k0})")
    axes[1].set_xticks(sweep, [str(s) for s in sweep])
    for m in METHODS:
        if (m, k0) in cells:
            axes[2].plot(budgets, [agg(cells[(m, k0)], f"probe@{b}")[0] for b in budgets], "o-", color=colors[m],
                         label=LABELS[m])
    axes[2].set(xscale="log", xlabel="latents per image (m)", ylabel="test accuracy",
                title=f"Small-budget probes (k = {k0})")
    axes[2].set_xticks(budgets, [str(b) for b in budgets])
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fashion-MNIST, EfficientNet-Lite0 `{layer}`")
    fig.tight_layout()
    paths.append(dest / f"{layer}_comparison.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(out: str, *layers: str) -> None:
    out_path = Path(out)
    dest = out_path / "summary"
    dest.mkdir(parents=True, exist_ok=True)
    times = json.loads((out_path / "times.json").read_text()) if (out_path / "times.json").exists() else {}
    lines = ["# Fashion-MNIST comparison: summary", "",
             "Written by experiments/fmnist_summary.py from the sae-eval reports on the test split.", ""]
    doc = {"times_s": times, "layers": {}}
    for layer in layers:
        part, data = layer_section(out_path, layer, dest)
        lines += part
        doc["layers"][layer] = data
    if times:
        lines += ["## Wall time per stage (this machine)", "",
                  *table(["stage", "seconds", "minutes"], [[k, f"{v:.0f}", f"{v / 60:.1f}"] for k, v in times.items()]),
                  ""]
    (dest / "summary.md").write_text("\n".join(lines))
    (dest / "summary.json").write_text(json.dumps(doc, indent=1))
    print(dest / "summary.md")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python experiments/fmnist_summary.py OUT LAYER [LAYER ...]")
    main(*sys.argv[1:])
