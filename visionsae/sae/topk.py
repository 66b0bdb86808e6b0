"""Top-k SAE (Gao et al. 2024; the recipe of docs/methods.md section 1).

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

    def saelens_export(self):
        # rescale_acts_by_decoder_norm scales each latent by its decoder row's norm, 1 here (to float32
        # rounding): a no-op that lets SAELens fold the decoder norm (load_from_disk(fold_W_dec_norm=True)).
        return "topk", self.saelens_weights(), {"k": self.cfg.k, "rescale_acts_by_decoder_norm": True}

    def sparsify_export(self):
        # sparsify computes topk(relu(W (x - b_dec) + b)); this model keeps the k largest of z and ReLUs them:
        # the same code wherever fewer than k latents are positive too (those extra entries are zeros).
        tensors = {"encoder.weight": self.W_enc.detach().contiguous(),
                   "encoder.bias": self.b_enc.detach().contiguous(), "W_dec": self.W_dec.detach().contiguous(),
                   "b_dec": self.b_dec.detach().contiguous()}
        # SparseCoderConfig's fields; expansion_factor is unused when num_latents is set, so it is the ratio
        # rounded (an int field), for a reader that shows it.
        cfg = {"activation": "topk", "expansion_factor": max(1, round(self.cfg.n_latents / self.cfg.d_in)),
               "normalize_decoder": True, "num_latents": self.cfg.n_latents, "k": self.cfg.k, "multi_topk": False,
               "skip_connection": False, "transcode": False, "d_in": self.cfg.d_in}
        return tensors, cfg
