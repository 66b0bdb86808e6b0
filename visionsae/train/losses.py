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
              n_dead: int, k_aux: int) -> torch.Tensor:
    """Dead latents reconstruct the (detached) residual x - x_hat (Gao et al. 2024, appendix A.2).

    The k_aux largest pre-activations among dead latents, ReLU'd, decoded WITHOUT b_dec (the residual
    has no offset to model), squared error normalised by the residual's variance, and scaled by
    min(n_dead / k_aux, 1) so a handful of dead latents gets a proportionally small push.
    """
    e_BD = residual_BD.detach().float()
    k_eff = min(k_aux, n_dead)
    masked_BN = torch.where(dead_N[None, :], z_BN, torch.full_like(z_BN, float("-inf")))
    vals_BK, idx_BK = masked_BN.topk(k_eff, dim=1, sorted=False)
    e_hat_BD = model.decode_latents(vals_BK.relu(), idx_BK).float()
    err = (e_hat_BD - e_BD).pow(2).sum(1).mean()
    # The residual's variance over the whole batch (all ranks); it is detached, so no gradient path.
    stats = torch.cat([e_BD.sum(0), e_BD.pow(2).sum().reshape(1), e_BD.new_tensor([e_BD.shape[0]])])
    if _distributed():
        dist.all_reduce(stats)
    n = stats[-1]
    var = stats[-2] / n - (stats[:-2] / n).pow(2).sum()
    return min(n_dead / k_aux, 1.0) * err / var.clamp_min(1e-12)


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
    return torch.stack([sse, tot, (acts_BK > 0).sum().float(), x_BD.new_tensor(float(x_BD.shape[0]))])
