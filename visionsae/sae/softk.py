"""SoftSAE (Stepien et al. 2026): a per-input k predicted by a small MLP, trained through LapSum soft top-k.

    h = ReLU(W_enc (x - b_dec) + b_enc)                      (z_BN of the interface)
    k^ = clamp(k_max * sigmoid(MLP(x - b_dec)), 1, n)        MLP: Linear(d, H) -> ReLU -> Linear(H, 1)
    soft phase:  f = h * soft_topk_mask(h, k^, alpha),  x_hat = W_dec^T f + b_dec (dense: f has no zeros
                 where h > 0, and the gradient to k^ runs through every entry of the mask)
    hard phase:  keep the floor(k^) largest entries of h, x_hat by gathering their decoder rows.

Training adds w_k * softplus_5(mean_batch(k^) - k_target): the penalty is on the batch MEAN, so
single inputs may use more or fewer latents. k_target anneals linearly down to k; the last
``hard_frac`` of training runs the hard phase (k^ then gets no gradient), which is also what
evaluation runs. ``model(x, k=k')`` overrides the estimator with a plain Top-k'.

Settings, against the public code (St0pien/SoftSAE), which normalises inputs to E||x||^2 = 1 and
uses a sum-of-squares error, while this project trains at E||x||^2 = d with that error divided by the
scaled variance (rec = SSE_ref / f, f = E||x - mean||^2 / E||x||^2, the variance fraction):

- ``k_weight``: the reference's weight 1 becomes 1 / f here (its loss is f * (rec + penalty / f)).
- ``alpha``: stated in the reference's units (inputs at E||x||^2 = 1; default 1e-4, theirs); h here is
  sqrt(d) times larger, so the model applies alpha * sqrt(d_in) (and folding divides by the input scale).
- ``k_max`` = 2 k: k^ <= 2 k (their dictionary_learning trainer; their CLIP script builds the model
  with k = d and so caps at 2 d). The fixed cap also fixes the width of every top-k taken here.
- ``k_start``: k_target starts at min(d, k_max) (they start at d; above k_max the penalty is ~0,
  since k^ <= k_max, so both schedules act the same from there on).
- the anneal runs over max(``anneal_frac`` of the steps, ``min_anneal_steps``), at most half of the
  soft phase: 4% of a short run is a few Adam time constants, and k^ then undershoots its target.
- ``hard_frac`` = 0.15 (their CLIP run: 6,000 of 40,000 steps).
How long: the anneal takes at least 200 steps; after it the mean k^ sits about one latent below k (the
softplus penalty on the batch mean still pushes down where reconstruction gains little from one more latent):
held-out mean k^ 14.5 at k = 16 after 200 steps on EfficientNet-Lite0 embeddings of Fashion-MNIST, 3.4 and
3.1 at k = 4 after 300 and 1,500 steps on synthetic data. Comparisons with Top-k want 1,500 steps or more.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from visionsae.errors import UserError
from visionsae.sae.base import SAEConfig, SAEOutput, VariantSettings
from visionsae.sae.dictionary import DictionarySAE, batch_mean
from visionsae.sae.lapsum import soft_topk_mask
from visionsae.sae.registry import register

K_PENALTY_BETA = 5.0  # softplus sharpness of the k penalty (docs/methods.md section 4)


def _keep_first(vals_BK: torch.Tensor, kf_B: torch.Tensor) -> torch.Tensor:
    """Zero the entries of each row beyond its own count kf_B (vals sorted descending)."""
    pos_K = torch.arange(vals_BK.shape[1], device=vals_BK.device)
    return torch.where(pos_K[None, :] < kf_B[:, None], vals_BK, torch.zeros_like(vals_BK))


def anneal_steps(total_steps: int, anneal_frac: float, min_anneal_steps: int, hard_frac: float) -> int:
    """Steps over which k_target goes from k_start to k: the fraction, at least the minimum, at most
    half of the soft phase."""
    soft = total_steps - int(hard_frac * total_steps)
    return min(max(int(anneal_frac * total_steps), min_anneal_steps), soft // 2)


@dataclasses.dataclass(frozen=True)
class SoftKSettings(VariantSettings):
    """SoftSAE's settings (the module docstring says how each default follows the reference)."""

    k_weight: float  # w_k, the k penalty's weight: 1 / variance fraction
    k_max: float  # k^ <= k_max: 2 k
    k_start: float  # k_target's start: min(d, k_max)
    kest_hidden: int  # the k-estimator's hidden width: n
    alpha: float = 1e-4  # LapSum temperature at E||x||^2 = 1 (the reference's units; applied x sqrt(d_in))
    anneal_frac: float = 0.04
    min_anneal_steps: int = 200
    hard_frac: float = 0.15

    flags = {"softk_alpha": "alpha", "softk_weight": "k_weight"}  # sae-train --softk-alpha, --softk-weight

    @classmethod
    def defaults(cls, d_in: int, n_latents: int, k: int, variance_fraction: float) -> "SoftKSettings":
        assert variance_fraction > 0, f"variance fraction must be positive, got {variance_fraction}"
        k_max = float(min(2 * k, n_latents))
        return cls(k_weight=1.0 / variance_fraction, k_max=k_max, k_start=float(min(max(d_in, k), k_max)),
                   kest_hidden=int(n_latents))

    def __post_init__(self):
        assert self.k_weight >= 0 and 0 <= self.anneal_frac <= 1 and 0 <= self.hard_frac <= 1 and self.alpha > 0 \
            and 1 <= self.k_max and self.min_anneal_steps >= 0, f"bad SoftSAE settings: {self}"


@register
class SoftKSAE(DictionarySAE):
    arch = "softk"
    Settings = SoftKSettings

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        n, d = cfg.n_latents, cfg.d_in
        st = self.settings
        self.k_start, self.k_max, self.k_weight = st.k_start, st.k_max, st.k_weight
        self.anneal_frac, self.min_anneal_steps, self.hard_frac = st.anneal_frac, st.min_anneal_steps, st.hard_frac
        alpha, hidden = st.alpha, st.kest_hidden
        # Every top-k here has this width: k^ <= k_max, so no row ever keeps more (a fixed shape, no sync).
        self.width = min(n, max(1, math.ceil(self.k_max)))
        # k-estimator, first layer initialised like the encoder (as the public code does).
        self.kest_W1 = nn.Parameter(self.W_enc.detach()[: min(hidden, n)].clone()
                                    if hidden <= n else torch.randn(hidden, d) / d ** 0.5)
        self.kest_b1 = nn.Parameter(torch.zeros(hidden))
        self.kest_w2 = nn.Parameter(torch.empty(1, hidden).uniform_(-1, 1) / hidden ** 0.5)
        self.kest_b2 = nn.Parameter(torch.zeros(1))
        # In training units (E||x||^2 = d); a buffer so that fold_input_scale rescales it with the activations.
        self.register_buffer("alpha", torch.tensor(alpha * math.sqrt(d)))
        self.k_target = self.k_start
        self.hard = False

    # --- pieces ------------------------------------------------------------------------------
    def estimate_k(self, x_BD: torch.Tensor) -> torch.Tensor:
        """k^_B, continuous, in [1, min(k_max, n)]."""
        hid_BH = F.linear(x_BD - self.b_dec, self.kest_W1, self.kest_b1).relu()
        logit_B = F.linear(hid_BH, self.kest_w2, self.kest_b2).squeeze(1).float()
        return (self.k_max * torch.sigmoid(logit_B)).clamp(1.0, float(self.cfg.n_latents))

    def encode_pre(self, x_BD: torch.Tensor) -> torch.Tensor:
        return super().encode_pre(x_BD).relu()

    def _floor_k(self, khat_B: torch.Tensor) -> torch.Tensor:
        return khat_B.detach().floor().long().clamp(1, self.width)

    def _hard(self, h_BN: torch.Tensor, khat_B: torch.Tensor):
        vals_BK, idx_BK = h_BN.topk(self.width, dim=1, sorted=True)
        return _keep_first(vals_BK, self._floor_k(khat_B)), idx_BK

    def sparsify(self, z_BN: torch.Tensor, x_BD: torch.Tensor, k: int | None = None):
        if k is not None:
            return self.plain_topk(z_BN, k)
        khat_B = self.estimate_k(x_BD)
        acts_BK, idx_BK = self._hard(z_BN, khat_B)
        return acts_BK, idx_BK, khat_B

    def forward(self, x_BD: torch.Tensor, k: int | None = None) -> SAEOutput:
        h_BN = self.encode_pre(x_BD)
        if k is not None or not self.training or self.hard:
            acts_BK, idx_BK, k_B = self.sparsify(h_BN, x_BD, k)
            if k is None and self.training:  # hard phase: rows padded to the k cap, so one matmul beats a gather
                x_hat_BD = self.decode_dense(self.dense_code(acts_BK, idx_BK))
                return SAEOutput(x_hat_BD, h_BN, acts_BK, idx_BK, k_B)
            return SAEOutput(self.decode(acts_BK, idx_BK), h_BN, acts_BK, idx_BK, k_B)
        khat_B = self.estimate_k(x_BD)
        f_BN = h_BN.float() * soft_topk_mask(h_BN.float(), khat_B, self.alpha, k_bound=self.k_max)
        x_hat_BD = self.decode_dense(f_BN)
        # The code reported for statistics (L0, dead latents, regularizer support): the floor(k^) largest.
        vals_BK, idx_BK = f_BN.topk(self.width, dim=1, sorted=True)
        return SAEOutput(x_hat_BD, h_BN, _keep_first(vals_BK, self._floor_k(khat_B)), idx_BK, khat_B)

    def support_mask(self, out: SAEOutput) -> torch.Tensor:
        return out.acts_BK > 0

    def saelens_export(self):
        raise UserError("a 'softk' SAE has no SAELens architecture (SoftSAE picks k per input): "
                        "evaluate it with sae-eval instead")

    # --- training hooks ------------------------------------------------------------------------
    def begin_step(self, step: int, total_steps: int) -> None:
        anneal = anneal_steps(total_steps, self.anneal_frac, self.min_anneal_steps, self.hard_frac)
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
