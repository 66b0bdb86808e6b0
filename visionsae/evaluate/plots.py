"""PNG figures, all checkpoints on one figure each (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def write_plots(result, out: Path) -> dict[str, Path]:
    """{kind: file} of the figures that have something to show."""
    cks = [c.summary for c in result.checkpoints]
    files = {}
    for kind, fn in (("fvu_vs_k", _fvu_vs_k), ("probe_vs_budget", _probe_vs_budget),
                     ("firing_density", _firing_density), ("k_distribution", _k_distribution)):
        fig = fn(cks)
        if fig is None:
            continue
        path = out / f"{kind}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files[kind] = path
    return files


def _fvu_vs_k(cks: list[dict]):
    if not any(c["k_sweep"] for c in cks):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in cks:
        ks = sorted(int(k) for k in c["k_sweep"])
        if not ks:
            continue
        line, = ax.plot(ks, [c["k_sweep"][str(k)]["fvu"] for k in ks], marker="o", label=c["name"])
        # the training k, where the sweep meets the plain metrics
        ax.plot([c["config"]["k"]], [c["reconstruction"]["fvu"]], marker="*", markersize=12, color=line.get_color())
    return _finish(fig, ax, "inference-time k'", "FVU (held-out)",
                   "Robustness to the inference-time k (star: training k)", log2=True)


def _probe_vs_budget(cks: list[dict]):
    with_probes = [c for c in cks if c["probes"].get("budgets")]
    if not with_probes:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    raws = set()
    for c in with_probes:
        ms = sorted(int(m) for m in c["probes"]["budgets"])
        ax.plot(ms, [c["probes"]["budgets"][str(m)]["accuracy"] for m in ms], marker="o", label=c["name"])
        raws.add((c["probes"]["raw"]["accuracy"], c["probes"]["chance"]))
    for i, (raw, chance) in enumerate(sorted(raws)):
        ax.axhline(raw, color="black", linestyle="--", linewidth=1, label="raw activations" if i == 0 else None)
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="majority class" if i == 0 else None)
    return _finish(fig, ax, "budget m (largest latents kept per image)", "probe accuracy (held-out)",
                   "Small-budget linear probing", log2=True)


def _firing_density(cks: list[dict]):
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in cks:
        h = c["sparsity"]["density_histogram"]
        edges, counts = h["log10_edges"], h["counts"]
        ax.stairs(counts, edges, label=f"{c['name']} ({c['sparsity']['dead']} dead)")
    return _finish(fig, ax, "log10 firing density (share of held-out rows)", "live latents",
                   "Firing density of live latents")


def _k_distribution(cks: list[dict]):
    soft = [c for c in cks if c["sparsity"].get("k_distribution")]
    if not soft:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in soft:
        kd = c["sparsity"]["k_distribution"]
        ax.stairs(kd["hist_counts"], kd["hist_edges"], label=f"{c['name']} (mean {kd['mean']:.1f})")
    return _finish(fig, ax, "per-input k", "rows", "Per-input k of SoftSAE checkpoints")


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, log2: bool = False):
    """The labels, grid and legend every figure of the report shares."""
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
