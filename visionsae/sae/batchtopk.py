"""BatchTopK SAE (Bussmann et al. 2024): Top-(k*B) over the whole batch in training, a threshold at inference.

In training the batch keeps its k*B largest ReLU'd activations, so inputs get a varying number of
latents averaging k. At inference a latent fires where its activation exceeds one global threshold.

The threshold belongs to the weights the model ends with, so it is fitted to them, not tracked along
the way: ``calibrate(rows)`` sets it to the (k*M)-th largest activation over M training rows (the cut
that one BatchTopK batch of those M rows would make), and the trainer calls it before every saved
checkpoint and before the final validation. The public trainers track a running average of each
batch's smallest kept activation instead (dictionary_learning: momentum 0.999, started after 1,000
steps; SAELens: a small fixed rate). A running average lags the cut, which falls all through training:
this project's earlier average (momentum 0.99 from step 0) ended well above the final model's cut and
halved the inference L0. Fitting on the final weights has no lag and no start step to tune, and the
training step never reads or writes the threshold (no host synchronisation).

Under torch.distributed the training batch spans ranks: the cut-off value is found over the gathered
per-rank candidates, so two ranks select what one process would.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from visionsae.sae.base import SAEConfig, SAEOutput
from visionsae.sae.dictionary import DictionarySAE
from visionsae.sae.registry import register

CALIBRATION_CHUNK = 1024  # rows encoded at a time while fitting the threshold


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
    needs_calibration: ClassVar[bool] = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        # Negative = not yet fitted (a model that never went through calibrate): inference then keeps
        # the k largest per input, a rule that does not depend on which rows share the batch.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def sparsify(self, z_BN: torch.Tensor, x_BD: torch.Tensor, k: int | None = None):
        a_BN = z_BN.relu()
        if k is not None:
            return self.plain_topk(a_BN, k)
        if self.training:
            cutoff = _global_cutoff(a_BN, self.cfg.k)
            keep_BN = (a_BN >= cutoff) & (a_BN > 0)
            # Dense (K = n, zeros are padding): no read-back of the widest row's count; forward decodes it densely.
            return a_BN * keep_BN, torch.arange(a_BN.shape[1], device=a_BN.device).expand_as(a_BN), None
        if self.threshold < 0:
            return self.plain_topk(a_BN, self.cfg.k)
        keep_BN = (a_BN >= self.threshold) & (a_BN > 0)
        acts_BK, idx_BK = _pad_rows(keep_BN, a_BN)
        return acts_BK, idx_BK, None

    @torch.no_grad()
    def calibrate(self, x_MD: torch.Tensor) -> None:
        """threshold = the (k*M)-th largest ReLU'd pre-activation over the M rows x_MD (training units).

        Latents fire on exactly k*M entries of these rows, i.e. k per row on average, as in training.
        Each chunk contributes its own k*(M) largest values at most, so memory stays O(k*M + chunk*N).
        """
        M = x_MD.shape[0]
        assert M >= 1, "calibrate needs at least one row"
        n_keep = min(self.cfg.k * M, M * self.cfg.n_latents)
        was_training = self.training
        self.eval()
        cand = []
        for i in range(0, M, CALIBRATION_CHUNK):
            a_flat = self.encode_pre(x_MD[i:i + CALIBRATION_CHUNK].to(self.W_enc.device, self.W_enc.dtype))
            a_flat = a_flat.relu().flatten()
            cand.append(a_flat.topk(min(n_keep, a_flat.numel()), sorted=False).values)
        top = torch.cat(cand).topk(n_keep, sorted=False).values
        self.threshold.copy_(top.min().to(self.threshold.dtype))
        self.train(was_training)

    def forward(self, x_BD: torch.Tensor, k: int | None = None) -> SAEOutput:
        z_BN = self.encode_pre(x_BD)
        acts_BK, idx_BK, _ = self.sparsify(z_BN, x_BD, k)
        if k is None and self.training:  # the dense training code: one matmul, equal to the gathered decode
            return SAEOutput(self.decode_dense(acts_BK), z_BN, acts_BK, idx_BK, None)
        return SAEOutput(self.decode(acts_BK, idx_BK), z_BN, acts_BK, idx_BK, None)

    def support_mask(self, out: SAEOutput) -> torch.Tensor:
        return out.acts_BK > 0

    def saelens_export(self):
        # JumpReLU with every threshold equal to the fitted one: keep z > threshold, this model's inference rule.
        tensors = self.saelens_weights()
        tensors["threshold"] = torch.full((self.cfg.n_latents,), float(self.threshold.clamp_min(0)),
                                          dtype=self.W_dec.dtype)
        return "jumprelu", tensors, {}

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        if self.threshold >= 0:
            self.threshold /= scale
