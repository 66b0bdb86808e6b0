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

import numpy as np
import torch
from scipy.stats import spearmanr

from visionsae.errors import UserError, one_line_errors
from visionsae.evaluate.inputs import eval_slots, group_checkpoints, load_checkpoints
from visionsae.evaluate.metrics import code_concentration


@one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser(description="SoftSAE per-input k against input complexity")
    ap.add_argument("softk")
    ap.add_argument("topk")
    ap.add_argument("--store", default=None, help="sibling store to evaluate on (default: held-out images)")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    # sae-eval's own rules: the same store checks, and the same images (held-out or every sibling image, the
    # same seeded subset under --max-images)
    softk_ck, topk_ck = load_checkpoints([args.softk, args.topk], torch.device("cpu"))
    groups = group_checkpoints([softk_ck, topk_ck], args.store)
    if len(groups) != 1:
        raise UserError("the two checkpoints were trained on different stores or layers: pass a matching pair")
    group = groups[0]
    store, layer, softk, topk = group.store, group.layer, softk_ck.model.eval(), topk_ck.model.eval()
    slots = eval_slots(group, args.max_images, seed=0)
    T = store.layer(layer).tokens_per_image
    x_BD = torch.from_numpy(store.read_slots(layer, slots))
    labels = np.repeat(store.labels[slots], T)
    k_parts, err_parts, n90_parts = [], [], []
    with torch.no_grad():
        for x in x_BD.split(8192):
            k_parts.append(softk(x).k_B.float())
            out = topk(x)
            err_parts.append((out.x_hat_BD - x).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-12))
            n90_parts.append(code_concentration(out.z_BN)[1])  # NaN where z has no positive entry
    k_B, rel_err_B, n90_B = (torch.cat(p).numpy() for p in (k_parts, err_parts, n90_parts))
    result = {"n_inputs": int(len(k_B)), "n_images": int(len(slots)), "k_mean": float(k_B.mean()),
              "k_std": float(k_B.std()), "k_q05": float(np.quantile(k_B, 0.05)),
              "k_q95": float(np.quantile(k_B, 0.95)), "spearman": {}}
    print(f"inputs: {len(k_B)} ({len(slots)} images); SoftSAE k: mean {k_B.mean():.2f}, std {k_B.std():.2f}, "
          f"q05 {result['k_q05']:.1f}, q95 {result['k_q95']:.1f}")
    for name, v in (("topk_rel_error", rel_err_B), ("topk_latents_for_90pct", n90_B),
                    ("input_norm", x_BD.norm(dim=1).numpy())):
        rho, p = spearmanr(k_B, v, nan_policy="omit")
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
