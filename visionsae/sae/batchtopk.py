"""BatchTopK SAE (Bussmann et al. 2024): Top-(k*B) over the whole batch in training, a threshold at inference.

In training the batch keeps its k*B largest ReLU'd activations, so inputs get a varying number of
latents averaging k. The threshold used at inference is a running average of the smallest kept
activation per training batch. Under torch.distributed the batch spans ranks: the cut-off value is
found over the gathered per-rank candidates, so two ranks select what one process would.
"""

from __future__ import annotations

import torch

from visionsae.sae.base import SAEConfig, SAEOutput
from visionsae.sae.dictionary import DictionarySAE
from visionsae.sae.registry import register


def _pad_rows(keep_BN: torch.Tensor, vals_BN: torch.Tensor):
    """(acts_BK, idx_BK) of the kept entries, K = most kept in any row, zero-padded."""
    K = max(int(keep_BN.sum(1).max()), 1)
    masked_BN = torch.where(keep_BN, vals_BN, torch.zeros_like(vals_BN))
    acts_BK, idx_BK = masked_BN.topk(K, dim=1, sorted=False)
    return acts_BK, idx_BK


def _global_cutoff(a_BN: torch.Tensor, k: int) -> torch.Tensor:
    """The value of the (k*B)-th largest entry over the whole batch, B summed over ranks."""
    flat = a_BN.detach().flatten()
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    n_keep = k * a_BN.shape[0] * world
    # Each rank sends its own top n_keep: a superset of its share of the global top n_keep.
    cand = flat.topk(min(n_keep, flat.numel()), sorted=False).values
    if world > 1:
        parts = [torch.empty_like(cand) for _ in range(world)]
        torch.distributed.all_gather(parts, cand.contiguous())
        cand = torch.cat(parts)
    return cand.topk(min(n_keep, cand.numel()), sorted=False).values.min()


@register
class BatchTopKSAE(DictionarySAE):
    arch = "batchtopk"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold_momentum = float(cfg.extra.get("threshold_momentum", 0.99))
        # Negative = not yet estimated; the first training batch sets it.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def sparsify(self, z_BN: torch.Tensor, x_BD: torch.Tensor, k: int | None = None):
        a_BN = z_BN.relu()
        if k is not None:
            vals_BK, idx_BK = a_BN.topk(self._check_k(k), dim=1, sorted=False)
            return vals_BK, idx_BK, None
        if self.training:
            cutoff = _global_cutoff(a_BN, self.cfg.k)
            keep_BN = (a_BN >= cutoff) & (a_BN > 0)
            self._update_threshold(a_BN.detach(), keep_BN)
            # Dense (K = n, zeros are padding): no read-back of the widest row's count; forward decodes it densely.
            return a_BN * keep_BN, torch.arange(a_BN.shape[1], device=a_BN.device).expand_as(a_BN), None
        else:
            thr = self.threshold.clamp_min(0)
            keep_BN = a_BN > thr
        acts_BK, idx_BK = _pad_rows(keep_BN, a_BN)
        return acts_BK, idx_BK, None

    @torch.no_grad()
    def _update_threshold(self, a_BN: torch.Tensor, keep_BN: torch.Tensor) -> None:
        kept = torch.where(keep_BN, a_BN, torch.full_like(a_BN, float("inf")))
        low = kept.min().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        # Branches as torch.where, so the step never reads the threshold back.
        m = self.threshold_momentum
        new = torch.where(self.threshold < 0, low, self.threshold * m + (1 - m) * low)
        self.threshold.copy_(torch.where(torch.isfinite(low), new, self.threshold))

    def forward(self, x_BD: torch.Tensor, k: int | None = None) -> SAEOutput:
        z_BN = self.encode_pre(x_BD)
        acts_BK, idx_BK, _ = self.sparsify(z_BN, x_BD, k)
        if k is None and self.training:  # the dense training code: one matmul, equal to the gathered decode
            return SAEOutput(acts_BK.to(self.W_dec.dtype) @ self.W_dec + self.b_dec, z_BN, acts_BK, idx_BK, None)
        return SAEOutput(self.decode(acts_BK, idx_BK), z_BN, acts_BK, idx_BK, None)

    def support_mask(self, out: SAEOutput) -> torch.Tensor:
        return out.acts_BK > 0

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        if self.threshold >= 0:
            self.threshold /= scale
