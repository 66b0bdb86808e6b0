"""Reconstruction and AuxK losses, and the batch statistics logged beside them.

Reconstruction: normalised MSE, sum_d (x - x_hat)^2 averaged over the batch and divided by the data's
total variance E||x - mean||^2 (one constant from the store statistics, in scaled units). It reads as
the fraction of variance unexplained, starts near 1 whatever the layer, and, being a per-input mean
with a constant denominator, is the same whether the batch is on one process or split across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from visionsae.sae.base import SparseAutoencoder


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def normalized_mse(x_hat_BD: torch.Tensor, x_BD: torch.Tensor, variance: float) -> torch.Tensor:
    return (x_hat_BD.float() - x_BD).pow(2).sum(1).mean() / variance


def auxk_loss(model: SparseAutoencoder, z_BN: torch.Tensor, residual_BD: torch.Tensor, dead_N: torch.Tensor,
              k_aux: int) -> torch.Tensor:
    """Dead latents reconstruct the (detached) residual x - x_hat (Gao et al. 2024, appendix A.2).

    The k_aux largest pre-activations among dead latents, ReLU'd, decoded WITHOUT b_dec (the residual
    has no offset to model), squared error normalised by the residual's variance, and scaled by
    min(n_dead / k_aux, 1) so a handful of dead latents gets a proportionally small push.

    No host synchronisation: k_aux is fixed and the number of dead latents stays a tensor. With fewer
    than k_aux dead latents the surplus picks are -inf, ReLU'd to exactly 0: they add nothing to the
    reconstruction and get no gradient, so the value equals a Top-min(k_aux, n_dead) over the dead ones
    (and is 0 when none is dead).
    """
    e_BD = residual_BD.detach().float()
    masked_BN = z_BN.masked_fill(~dead_N[None, :], float("-inf"))
    vals_BK, idx_BK = masked_BN.topk(min(k_aux, z_BN.shape[1]), dim=1, sorted=False)
    e_hat_BD = model.decode_latents(vals_BK.relu(), idx_BK).float()
    err = (e_hat_BD - e_BD).pow(2).sum(1).mean()
    # The residual's variance over the whole batch (all ranks); it is detached, so no gradient path.
    rows = torch.full((1,), float(e_BD.shape[0]), dtype=e_BD.dtype, device=e_BD.device)  # a fill, no upload
    stats = torch.cat([e_BD.sum(0), e_BD.pow(2).sum().reshape(1), rows])
    if _distributed():
        dist.all_reduce(stats)
    n = stats[-1]
    var = stats[-2] / n - (stats[:-2] / n).pow(2).sum()
    scale = (dead_N.sum() / k_aux).clamp_max(1.0)
    return scale * err / var.clamp_min(1e-12)


def global_active(active_N: torch.Tensor) -> torch.Tensor:
    """Union over ranks of a per-rank bool mask."""
    if not _distributed():
        return active_N
    counts = active_N.to(torch.int32)
    dist.all_reduce(counts)
    return counts > 0


@torch.no_grad()
def batch_stats(x_BD: torch.Tensor, x_hat_BD: torch.Tensor, acts_BK: torch.Tensor) -> torch.Tensor:
    """[squared error, sum ||x - batch mean||^2, fired entries, rows]: summable across steps and ranks."""
    x_hat = x_hat_BD.float()
    sse = (x_hat - x_BD).pow(2).sum()
    tot = (x_BD - x_BD.mean(0)).pow(2).sum()
    rows = torch.full((), float(x_BD.shape[0]), dtype=sse.dtype, device=sse.device)  # a fill, no upload
    return torch.stack([sse, tot, (acts_BK > 0).sum().float(), rows])
