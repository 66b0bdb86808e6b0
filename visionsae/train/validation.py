"""Held-out metrics at the end of training (docs/methods.md section 7), on the validation images' rows."""

from __future__ import annotations

import torch

from visionsae.sae.base import SparseAutoencoder, firing_counts


@torch.no_grad()
def validation_metrics(model: SparseAutoencoder, x_BD: torch.Tensor, *, batch_size: int,
                       device: torch.device) -> dict[str, float]:
    """FVU, normalised MSE, L0, cosine, and the fraction of latents that never fire on these rows.

    Definitions are sae-eval's (evaluate/metrics.py): fvu a ratio of sums, nmse the mean over rows of
    ||x - x_hat||^2 / ||x||^2 (rows with x = 0 left out)."""
    was_training = model.training
    model.eval()
    mean_D = x_BD.double().mean(0)
    sse = tot = nmse = l0 = cos = 0.0
    n_nonzero = 0
    fired_N = torch.zeros(model.cfg.n_latents, dtype=torch.bool, device=device)
    for i in range(0, x_BD.shape[0], batch_size):
        x = x_BD[i:i + batch_size].to(device)
        out = model(x)
        x_hat = out.x_hat_BD.float()
        sse += float((x_hat - x).double().pow(2).sum())
        tot += float((x.double() - mean_D.to(device)).pow(2).sum())
        err_B = (x_hat - x).double().pow(2).sum(1)
        sq_B = x.double().pow(2).sum(1)
        ok_B = sq_B > 0
        nmse += float(torch.where(ok_B, err_B / torch.where(ok_B, sq_B, 1.0), 0.0).sum())
        n_nonzero += int(ok_B.sum())
        l0 += float((out.acts_BK > 0).sum())
        cos += float(torch.nn.functional.cosine_similarity(x_hat, x, dim=1).sum())
        fired_N |= firing_counts(out.acts_BK, out.idx_BK, model.cfg.n_latents) > 0
    model.train(was_training)
    n = x_BD.shape[0]
    return {"fvu": sse / max(tot, 1e-12), "nmse": nmse / n_nonzero if n_nonzero else float("nan"), "l0": l0 / n,
            "cos": cos / n, "dead_frac": float((~fired_N).float().mean()), "rows": float(n)}
