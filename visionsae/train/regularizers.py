"""The two sparsity regularizers of Jacquier et al. (docs/methods.md section 2), as plain functions of tensors.

Both act on z_BN, the encoder output that enters the Top-k, restricted to the batch-active units
A = union over the batch of the Top-k supports S_i. A is built from the supports (the indices), NOT
from ``z != 0``: a pre-Top-k z is almost never exactly zero, so that shortcut would make A every unit.
Values are batch means and unweighted (the trainer multiplies by beta / gamma).

``support_BK`` marks which entries of ``topk_idx_BK`` belong to S_i (variants with a varying number of
kept latents pad their rows); ``active_N`` passes a precomputed A, e.g. the union over all ranks.

``on`` names what the penalties measure (``--reg-on``): "raw" (default) penalises |z|, negative
pre-activations included, as the sample code circulating with the paper does (Top-k runs on the raw z,
then ReLU); "relu" penalises relu(z), the part that can enter the code, so negative entries get no
push. After 300 steps with both penalties on |z|, most of the off-support mass came from negative z,
whose gradient pushes them up toward firing: the choice is recorded in every checkpoint and report.
"""

from __future__ import annotations

import torch

from visionsae.sae.base import latent_counts, support_BN

REG_ON = ("raw", "relu")


def _measured(z: torch.Tensor, on: str) -> torch.Tensor:
    """What the penalties take the absolute value of: z itself, or its positive part."""
    assert on in REG_ON, f"on must be one of {REG_ON}, got {on!r}"
    return z if on == "raw" else z.relu()


def batch_active(topk_idx_BK: torch.Tensor, n: int, support_BK: torch.Tensor | None = None) -> torch.Tensor:
    """A as a bool mask [n]: units in the Top-k support of at least one input."""
    return latent_counts(topk_idx_BK, n, support_BK) > 0


def off_support_l1(z: torch.Tensor, topk_idx: torch.Tensor, *, support_BK: torch.Tensor | None = None,
                   active_N: torch.Tensor | None = None, on: str = "raw") -> torch.Tensor:
    """mean_i sum_{j in A minus S_i} |z_ij| (on = "relu": relu(z_ij))."""
    z = _measured(z, on)
    n = z.shape[1]
    A_N = batch_active(topk_idx, n, support_BK) if active_N is None else active_N
    S_BN = support_BN(topk_idx, n, support_BK)
    off_BN = A_N[None, :] & ~S_BN
    # where() (not a product with the mask) so units outside the set get exactly zero gradient.
    return torch.where(off_BN, z.abs(), torch.zeros_like(z)).sum(1).mean()


def l1_l2_ratio(z: torch.Tensor, topk_idx: torch.Tensor, *, support_BK: torch.Tensor | None = None,
                active_N: torch.Tensor | None = None, eps: float = 1e-8, on: str = "raw") -> torch.Tensor:
    """mean_i ||z_iA||_1 / (||z_iA||_2 + eps) (on = "relu": of relu(z))."""
    z = _measured(z, on)
    A_N = batch_active(topk_idx, z.shape[1], support_BK) if active_N is None else active_N
    zA_BA = z[:, A_N.nonzero().squeeze(1)]
    l1_B = zA_BA.abs().sum(1)
    # sqrt(sum of squares) written out with a floor inside: the gradient of a norm at exactly 0 is NaN.
    l2_B = zA_BA.pow(2).sum(1).clamp_min(1e-30).sqrt()
    return (l1_B / (l2_B + eps)).mean()


class _ActiveSetPenalties(torch.autograd.Function):
    """Both regularizers in a few passes over z, for the training step.

    Every support S_i lies inside A, so the off-support sum is ||z_iA||_1 minus the |z| of the K kept
    entries: no B x N support mask is built, and the backward is one expression over z restricted to
    A plus a K-per-row correction. Values and gradients equal those of the two functions above.
    """

    @staticmethod
    def forward(ctx, z_BN, A_N, idx_BK, support_BK, eps):
        zA_BN = z_BN * A_N.to(z_BN.dtype)
        l1_B = torch.linalg.vector_norm(zA_BN, 1, dim=1)
        l2_B = torch.linalg.vector_norm(zA_BN, 2, dim=1)
        zS_BK = z_BN.gather(1, idx_BK)
        if support_BK is not None:
            zS_BK = zS_BK * support_BK.to(zS_BK.dtype)
        off_B = l1_B - zS_BK.abs().sum(1)
        ctx.save_for_backward(zA_BN, idx_BK, zS_BK, l1_B, l2_B)
        ctx.eps = eps
        return off_B.mean(), (l1_B / (l2_B + eps)).mean()

    @staticmethod
    def backward(ctx, g_off, g_ratio):
        zA_BN, idx_BK, zS_BK, l1_B, l2_B = ctx.saved_tensors
        B = zA_BN.shape[0]
        g_off = torch.zeros((), dtype=zA_BN.dtype, device=zA_BN.device) if g_off is None else g_off
        g_ratio = torch.zeros((), dtype=zA_BN.dtype, device=zA_BN.device) if g_ratio is None else g_ratio
        den_B = l2_B + ctx.eps
        # d/dz of ||z_A||_1 / (||z_A||_2 + eps) = sign(z)/den - l1 z / (den^2 l2), zero outside A.
        c_sign_B = (g_off + g_ratio / den_B) / B
        c_lin_B = torch.where(l2_B > 0, g_ratio * l1_B / (den_B ** 2 * l2_B.clamp_min(1e-30)), torch.zeros_like(l2_B)) / B
        g_BN = torch.addcmul(-c_lin_B[:, None] * zA_BN, zA_BN.sign(), c_sign_B[:, None])
        g_BN.scatter_add_(1, idx_BK, -(g_off / B) * zS_BK.sign())
        return g_BN, None, None, None, None


def active_set_penalties(z: torch.Tensor, topk_idx: torch.Tensor, *, support_BK: torch.Tensor | None = None,
                         active_N: torch.Tensor | None = None, eps: float = 1e-8, on: str = "raw"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(off_support_l1, l1_l2_ratio) together, fused; same arguments and values as the two functions."""
    A_N = batch_active(topk_idx, z.shape[1], support_BK) if active_N is None else active_N
    # relu's backward (zero where z <= 0) composes with the fused one by autograd
    return _ActiveSetPenalties.apply(_measured(z, on), A_N, topk_idx, support_BK, eps)
