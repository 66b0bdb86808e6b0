"""Claim (d): does SoftSAE's per-input k track input complexity?

Complexity of an input (a row: an image embedding, or one token) is measured without SoftSAE: the relative
error of a plain Top-k SAE at its training k (inputs it reconstructs badly need more latents), and the number
of latents that carry 90% of that model's pre-activation mass. Prints Spearman correlations with SoftSAE's
per-input k, and the mean k per class.

    python experiments/softk_complexity.py SOFTK_CKPT TOPK_CKPT [--store TEST_STORE] [--max-images N] [--json OUT]

Without --store, the inputs are the SoftSAE checkpoint's held-out images of its training store; with it,
every valid image of a sibling store (same backbone and layer, e.g. the test split).
"""

import argparse
import json
import sys

import numpy as np
import torch
from scipy.stats import spearmanr

from visionsae.sae import load_checkpoint
from visionsae.store import open_store


def inputs(meta: dict, store_path: str | None, max_images: int | None, seed: int = 0):
    """The slots to read and the store to read them from."""
    rec = meta["store"]
    if store_path is None:
        store = open_store(rec["path"])
        slots = meta["split"]["val_slots"].numpy()
    else:
        store = open_store(store_path)
        if store.layer_fingerprint(rec["layer"]) != rec.get("layer_fingerprint"):
            sys.exit(f"error: {store_path} does not hold the layer the checkpoints were trained on (layer "
                     "fingerprint differs): pass a store extracted with the same backbone and settings")
        slots = np.nonzero(store.valid)[0]
    slots = slots[store.valid[slots]]
    if max_images is not None and slots.size > max_images:
        slots = np.sort(np.random.default_rng(seed).choice(slots, size=max_images, replace=False))
    return store, slots


def main() -> None:
    ap = argparse.ArgumentParser(description="SoftSAE per-input k against input complexity")
    ap.add_argument("softk")
    ap.add_argument("topk")
    ap.add_argument("--store", default=None, help="sibling store to evaluate on (default: held-out images)")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    softk, meta = load_checkpoint(args.softk)
    topk, _ = load_checkpoint(args.topk)
    store, slots = inputs(meta, args.store, args.max_images)
    layer = meta["store"]["layer"]
    T = store.layer(layer).tokens_per_image
    x_BD = torch.from_numpy(store.read_slots(layer, slots))
    labels = np.repeat(store.labels[slots], T)
    k_parts, err_parts, n90_parts = [], [], []
    with torch.no_grad():
        for x in x_BD.split(8192):
            k_parts.append(softk(x).k_B.float())
            out = topk(x)
            err_parts.append((out.x_hat_BD - x).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-12))
            zp_BN = out.z_BN.clamp_min(0)
            share_BN = zp_BN.sort(1, descending=True).values.cumsum(1) / zp_BN.sum(1, keepdim=True).clamp_min(1e-12)
            n90_parts.append((share_BN < 0.9).sum(1).float() + 1)
    k_B, rel_err_B, n90_B = (torch.cat(p).numpy() for p in (k_parts, err_parts, n90_parts))
    result = {"n_inputs": int(len(k_B)), "n_images": int(len(slots)), "k_mean": float(k_B.mean()),
              "k_std": float(k_B.std()), "k_q05": float(np.quantile(k_B, 0.05)),
              "k_q95": float(np.quantile(k_B, 0.95)), "spearman": {}}
    print(f"inputs: {len(k_B)} ({len(slots)} images); SoftSAE k: mean {k_B.mean():.2f}, std {k_B.std():.2f}, "
          f"q05 {result['k_q05']:.1f}, q95 {result['k_q95']:.1f}")
    for name, v in (("topk_rel_error", rel_err_B), ("topk_latents_for_90pct", n90_B),
                    ("input_norm", x_BD.norm(dim=1).numpy())):
        rho, p = spearmanr(k_B, v)
        result["spearman"][name] = {"rho": float(rho), "p": float(p)}
        print(f"Spearman(k, {name}) = {rho:+.3f} (p = {p:.1e})")
    classes = store.classes
    per_class = {classes[c] if c < len(classes) else str(c): float(k_B[labels == c].mean())
                 for c in np.unique(labels) if c >= 0}
    result["k_mean_per_class"] = dict(sorted(per_class.items(), key=lambda kv: -kv[1]))
    print("mean k per class: " + ", ".join(f"{name} {m:.1f}" for name, m in result["k_mean_per_class"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
