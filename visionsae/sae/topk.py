"""Top-k SAE (Gao et al. 2024; the recipe of papers.md section 4).

z = W_enc (x - b_dec) + b_enc; keep the k largest entries of z per input, then ReLU them (a kept
negative value becomes 0 but stays in the support: Top-k selects it); x_hat = sum over the kept
latents of act * W_dec row + b_dec. Decoder rows are unit-norm. The training loop adds AuxK.
"""

from __future__ import annotations

import torch

from visionsae.sae.base import SAEOutput
from visionsae.sae.dictionary import DictionarySAE, encode_topk
from visionsae.sae.registry import register


@register
class TopKSAE(DictionarySAE):
    arch = "topk"

    def sparsify(self, z_BN: torch.Tensor, x_BD: torch.Tensor, k: int | None = None):
        k = self._check_k(self.cfg.k if k is None else k)
        vals_BK, idx_BK = z_BN.topk(k, dim=1, sorted=False)
        return vals_BK.relu(), idx_BK, None

    def forward(self, x_BD: torch.Tensor, k: int | None = None) -> SAEOutput:
        # One fused op: when the loss ignores z (no regularizer, no AuxK), the backward stays sparse.
        k = self._check_k(self.cfg.k if k is None else k)
        assert x_BD.ndim == 2 and x_BD.shape[1] == self.cfg.d_in, \
            f"expected inputs [B, {self.cfg.d_in}], got {list(x_BD.shape)}"
        vals_BK, idx_BK, z_BN = encode_topk(x_BD, self.W_enc, self.b_dec, self.b_enc, k)
        acts_BK = vals_BK.relu()
        return SAEOutput(self.decode(acts_BK, idx_BK), z_BN, acts_BK, idx_BK, None)
