"""ReLU SAE with an l1 penalty, following Anthropic's April 2024 recipe.

f = ReLU(W_enc (x - b_dec) + b_enc); x_hat = W_dec^T f + b_dec with an UNCONSTRAINED decoder, and the
penalty lambda * mean_i sum_j f_ij ||W_dec_j|| (weighting by the decoder row norm stops the model from
shrinking f and growing W_dec to dodge the penalty). lambda ramps up linearly over the first 5% of
training. Two departures, both documented choices: the encoder keeps the pre-encoder bias of the other
variants (W_enc (x - b_dec) + b_enc is the same function class as W_enc x + b'), and the default lambda
is 5 / d_in: Anthropic's lambda = 5 goes with a sum-of-squares error on inputs scaled to E||x||^2 = d,
while this project's reconstruction loss is that error divided by the (scaled) variance, about d.
"""

from __future__ import annotations

import dataclasses

import torch

from visionsae.sae.base import SAEConfig, SAEOutput, VariantSettings
from visionsae.sae.dictionary import DictionarySAE
from visionsae.sae.registry import register


@dataclasses.dataclass(frozen=True)
class ReLUSettings(VariantSettings):
    l1_coeff: float  # lambda, the l1 weight (default 5 / d_in, see the module docstring)
    l1_warmup_frac: float = 0.05  # lambda ramps up linearly over this first fraction of training

    flags = {"l1_coeff": "l1_coeff"}  # sae-train --l1-coeff

    @classmethod
    def defaults(cls, d_in: int, n_latents: int, k: int, variance_fraction: float) -> "ReLUSettings":
        return cls(l1_coeff=5.0 / d_in)

    def __post_init__(self):
        assert self.l1_coeff >= 0, f"l1_coeff must be non-negative, got {self.l1_coeff}"


@register
class ReLUSAE(DictionarySAE):
    arch = "relu"
    Settings = ReLUSettings
    unit_norm_decoder = False
    uses_auxk = False  # the l1 recipe has no dead-latent revival
    decoder_init_norm = 0.1  # Anthropic: small random-direction decoder rows, W_enc = W_dec^T

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.l1_coeff = self.settings.l1_coeff
        self.l1_warmup_frac = self.settings.l1_warmup_frac
        self._l1_now = self.l1_coeff

    def sparsify(self, z_BN: torch.Tensor, x_BD: torch.Tensor, k: int | None = None):
        a_BN = z_BN.relu()
        if k is not None:
            return self.plain_topk(a_BN, k)
        if self.training:  # dense (K = n, zeros are padding): no read-back of the widest row's count
            return a_BN, torch.arange(a_BN.shape[1], device=a_BN.device).expand_as(a_BN), None
        K = max(int((a_BN > 0).sum(1).max()), 1)
        vals_BK, idx_BK = a_BN.topk(K, dim=1, sorted=False)
        return vals_BK, idx_BK, None

    def forward(self, x_BD: torch.Tensor, k: int | None = None) -> SAEOutput:
        z_BN = self.encode_pre(x_BD)
        acts_BK, idx_BK, _ = self.sparsify(z_BN, x_BD, k)
        if k is None and self.training:
            # Early in training ReLU codes are dense (half the latents fire): a dense decode is cheaper
            # than gathering that many rows, and equal to it.
            x_hat_BD = self.decode_dense(z_BN.relu())
        else:
            x_hat_BD = self.decode(acts_BK, idx_BK)
        return SAEOutput(x_hat_BD, z_BN, acts_BK, idx_BK, None)

    def support_mask(self, out: SAEOutput) -> torch.Tensor:
        return out.acts_BK > 0

    def saelens_export(self):
        return "standard", self.saelens_weights(), {}  # SAELens' standard SAE is this ReLU encoder

    def begin_step(self, step: int, total_steps: int) -> None:
        ramp = max(1, int(self.l1_warmup_frac * total_steps))
        self._l1_now = self.l1_coeff * min(1.0, (step + 1) / ramp)

    def aux_losses(self, x_BD, out: SAEOutput, step: int, total_steps: int) -> dict[str, torch.Tensor]:
        # Gather the kept rows' norms instead of a dense B x N product.
        norms_BK = self.W_dec.norm(dim=1)[out.idx_BK]
        l1_B = (out.acts_BK.float() * norms_BK).sum(1)
        return {"l1": self._l1_now * l1_B.mean()}
