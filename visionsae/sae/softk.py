"""SoftSAE (Stepien et al. 2026): a per-input k predicted by a small MLP, trained through LapSum soft top-k.

    h = ReLU(W_enc (x - b_dec) + b_enc)                      (z_BN of the interface)
    k^ = clamp(k_max * sigmoid(MLP(x - b_dec)), 1, n)        MLP: Linear(d, H) -> ReLU -> Linear(H, 1)
    soft phase:  f = h * soft_topk_mask(h, k^, alpha),  x_hat = W_dec^T f + b_dec (dense: f has no zeros
                 where h > 0, and the gradient to k^ runs through every entry of the mask)
    hard phase:  keep the floor(k^) largest entries of h, x_hat by gathering their decoder rows.

Training adds w_k * softplus_5(mean_batch(k^) - k_target): the penalty is on the batch MEAN, so
single inputs may use more or fewer latents. k_target anneals linearly from d_in (when d_in > k) down
to k over the first ``anneal_frac`` of training; the last ``hard_frac`` of training runs the hard
phase (k^ then gets no gradient), which is also what evaluation runs. ``model(x, k=k')`` overrides
the estimator with a plain Top-k'.

Defaults follow the public SoftSAE code: k_max = 2 * (starting k_target), alpha = 1e-4, anneal over
4% and a hard phase over the last 15% of steps. w_k defaults to 1 / d_in: the public code weights the
penalty 1 against a sum-of-squares error, and this project's reconstruction loss is that error
divided by the scaled variance (about d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionsae.sae.base import SAEConfig, SAEOutput
from visionsae.sae.dictionary import DictionarySAE, batch_mean
from visionsae.sae.lapsum import soft_topk_mask
from visionsae.sae.registry import register

K_PENALTY_BETA = 5.0  # softplus sharpness of the k penalty (papers.md section 2)


def _keep_first(vals_BK: torch.Tensor, kf_B: torch.Tensor) -> torch.Tensor:
    """Zero the entries of each row beyond its own count kf_B (vals sorted descending)."""
    pos_K = torch.arange(vals_BK.shape[1], device=vals_BK.device)
    return torch.where(pos_K[None, :] < kf_B[:, None], vals_BK, torch.zeros_like(vals_BK))


@register
class SoftKSAE(DictionarySAE):
    arch = "softk"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        ex = cfg.extra
        n, d = cfg.n_latents, cfg.d_in
        self.k_start = float(ex.get("k_start", max(d, cfg.k)))
        self.k_max = float(ex.get("k_max", 2.0 * self.k_start))
        self.anneal_frac = float(ex.get("anneal_frac", 0.04))
        self.hard_frac = float(ex.get("hard_frac", 0.15))
        self.k_weight = float(ex.get("k_weight", 1.0 / d))
        hidden = int(ex.get("kest_hidden", n))
        assert self.k_weight >= 0 and 0 <= self.anneal_frac <= 1 and 0 <= self.hard_frac <= 1, \
            f"bad SoftSAE settings: {ex}"
        # k-estimator, first layer initialised like the encoder (as the public code does).
        self.kest_W1 = nn.Parameter(self.W_enc.detach()[: min(hidden, n)].clone()
                                    if hidden <= n else torch.randn(hidden, d) / d ** 0.5)
        self.kest_b1 = nn.Parameter(torch.zeros(hidden))
        self.kest_w2 = nn.Parameter(torch.empty(1, hidden).uniform_(-1, 1) / hidden ** 0.5)
        self.kest_b2 = nn.Parameter(torch.zeros(1))
        # alpha is a buffer so that fold_input_scale can rescale it with the activations.
        self.register_buffer("alpha", torch.tensor(float(ex.get("alpha", 1e-4))))
        self.k_target = self.k_start
        self.hard = False

    # --- pieces ------------------------------------------------------------------------------
    def estimate_k(self, x_BD: torch.Tensor) -> torch.Tensor:
        """k^_B, continuous, in [1, n]."""
        hid_BH = F.linear(x_BD - self.b_dec, self.kest_W1, self.kest_b1).relu()
        logit_B = F.linear(hid_BH, self.kest_w2, self.kest_b2).squeeze(1).float()
        return (self.k_max * torch.sigmoid(logit_B)).clamp(1.0, float(self.cfg.n_latents))

    def encode_pre(self, x_BD: torch.Tensor) -> torch.Tensor:
        return super().encode_pre(x_BD).relu()

    def _hard(self, h_BN: torch.Tensor, khat_B: torch.Tensor):
        kf_B = khat_B.detach().floor().long().clamp(1, self.cfg.n_latents)
        # Training pads to the static cap (no read-back); evaluation may read the batch's largest k back.
        K = self._k_cap() if self.training else int(kf_B.max())
        vals_BK, idx_BK = h_BN.topk(K, dim=1, sorted=True)
        return _keep_first(vals_BK, kf_B), idx_BK

    def _k_cap(self) -> int:
        """floor(k^) <= min(floor(k_max), n) always: a padded width known without reading k^ back."""
        return max(1, min(int(self.k_max), self.cfg.n_latents))

    def sparsify(self, z_BN: torch.Tensor, x_BD: torch.Tensor, k: int | None = None):
        if k is not None:
            vals_BK, idx_BK = z_BN.topk(self._check_k(k), dim=1, sorted=False)
            return vals_BK, idx_BK, None
        khat_B = self.estimate_k(x_BD)
        acts_BK, idx_BK = self._hard(z_BN, khat_B)
        return acts_BK, idx_BK, khat_B

    def forward(self, x_BD: torch.Tensor, k: int | None = None) -> SAEOutput:
        h_BN = self.encode_pre(x_BD)
        if k is not None or not self.training or self.hard:
            acts_BK, idx_BK, k_B = self.sparsify(h_BN, x_BD, k)
            if k is None and self.training:  # hard phase: rows padded to the k cap, so one matmul beats a gather
                x_hat_BD = self.dense_code(acts_BK, idx_BK).to(self.W_dec.dtype) @ self.W_dec + self.b_dec
                return SAEOutput(x_hat_BD, h_BN, acts_BK, idx_BK, k_B)
            return SAEOutput(self.decode(acts_BK, idx_BK), h_BN, acts_BK, idx_BK, k_B)
        khat_B = self.estimate_k(x_BD)
        f_BN = h_BN.float() * soft_topk_mask(h_BN.float(), khat_B, self.alpha)
        x_hat_BD = f_BN.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        # The code reported for statistics (L0, dead latents, regularizer support): the floor(k^) largest.
        kf_B = khat_B.detach().floor().long().clamp(1, self.cfg.n_latents)
        vals_BK, idx_BK = f_BN.topk(self._k_cap(), dim=1, sorted=True)
        return SAEOutput(x_hat_BD, h_BN, _keep_first(vals_BK, kf_B), idx_BK, khat_B)

    def support_mask(self, out: SAEOutput) -> torch.Tensor:
        return out.acts_BK > 0

    # --- training hooks ------------------------------------------------------------------------
    def begin_step(self, step: int, total_steps: int) -> None:
        anneal = int(self.anneal_frac * total_steps)
        ratio = 1.0 if anneal <= 0 else min(step / anneal, 1.0)
        self.k_target = self.k_start + (self.cfg.k - self.k_start) * ratio
        self.hard = step >= total_steps - int(self.hard_frac * total_steps)

    def aux_losses(self, x_BD, out: SAEOutput, step: int, total_steps: int) -> dict[str, torch.Tensor]:
        if self.hard or out.k_B is None:
            return {}
        excess = batch_mean(out.k_B) - self.k_target
        return {"k_penalty": self.k_weight * F.softplus(excess, beta=K_PENALTY_BETA)}

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        # The estimator sees x - b_dec = (x' - b_dec')/s after folding: W1 * s restores its pre-activation.
        self.kest_W1 *= scale
        # h = h'/s: the same soft mask needs alpha/s (the hard phase is scale-free).
        self.alpha /= scale
