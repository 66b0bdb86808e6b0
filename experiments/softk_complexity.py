"""Claim (d): does SoftSAE's per-input k track input complexity?

Complexity of a held-out input is measured without SoftSAE: the relative error of a plain Top-k SAE at
its training k (inputs it reconstructs badly need more latents), and the number of latents that carry
90% of that model's pre-activation mass. Prints Spearman correlations with SoftSAE's per-input k.
Usage: python experiments/softk_complexity.py SOFTK_CKPT TOPK_CKPT
"""

import sys

import numpy as np
import torch
from scipy.stats import spearmanr

from visionsae.sae import load_checkpoint
from visionsae.store import open_store


def main(softk_path: str, topk_path: str) -> None:
    softk, meta = load_checkpoint(softk_path)
    topk, _ = load_checkpoint(topk_path)
    store = open_store(meta["store"]["path"])
    slots = meta["split"]["val_slots"].numpy()
    x_BD = torch.from_numpy(store.read_slots(meta["store"]["layer"], slots))
    labels = store.labels[slots]
    with torch.no_grad():
        k_B = softk(x_BD).k_B.float().numpy()
        out = topk(x_BD)
        rel_err_B = ((out.x_hat_BD - x_BD).pow(2).sum(1) / x_BD.pow(2).sum(1)).numpy()
        zp_BN = out.z_BN.clamp_min(0)
        share_BN = zp_BN.sort(1, descending=True).values.cumsum(1) / zp_BN.sum(1, keepdim=True).clamp_min(1e-12)
        n90_B = (share_BN < 0.9).sum(1).float().numpy() + 1
    print(f"held-out inputs: {len(k_B)}; SoftSAE k: mean {k_B.mean():.2f}, std {k_B.std():.2f}, "
          f"q05 {np.quantile(k_B, 0.05):.1f}, q95 {np.quantile(k_B, 0.95):.1f}")
    for name, v in (("Top-k relative error", rel_err_B), ("latents for 90% of Top-k z+", n90_B),
                    ("input norm", x_BD.norm(dim=1).numpy())):
        rho, p = spearmanr(k_B, v)
        print(f"Spearman(k, {name}) = {rho:+.3f} (p = {p:.1e})")
    classes = store.classes
    means = sorted(((k_B[labels == c].mean(), classes[c] if c < len(classes) else str(c))
                    for c in np.unique(labels)), reverse=True)
    print("mean k per class: " + ", ".join(f"{name} {m:.1f}" for m, name in means))


if __name__ == "__main__":
    main(*sys.argv[1:3])
