"""The body the linear SAE variants share: affine encoder on x - b_dec, gathered decoder, unit-norm rows.

Parameters (N latents, D input width):
    W_enc [N, D], b_enc [N], W_dec [N, D] (row j is latent j's direction), b_dec [D].

Encoding is z_BN = (x_BD - b_dec) W_enc^T + b_enc; decoding gathers the K kept rows of W_dec with
``F.embedding_bag`` (cost B*K*D instead of the B*N*D of a dense matmul over mostly zeros), unless K is a
large fraction of N (see ``gather_decode``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionsae.sae.base import SAEConfig, SparseAutoencoder


class _Encode(torch.autograd.Function):
    """z_BN = (x_BD - b_pre_D) @ W_ND^T + b_N, with a backward that skips the input-gradient matmul.

    Autograd would form the gradient of (x - b_pre), a full B x N x D matmul, only to sum it over the
    batch for b_pre; summing g_BN over the batch first makes it an N x D mat-vec, so a training step
    costs two big matmuls (forward and dW) instead of three.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x_BD, W_ND, b_pre_D, b_N):
        xc_BD = x_BD - b_pre_D
        ctx.save_for_backward(xc_BD, W_ND)
        return F.linear(xc_BD, W_ND, b_N)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_BN):
        xc_BD, W_ND = ctx.saved_tensors
        return _dense_backward(xc_BD, W_ND, ctx.needs_input_grad, g_BN)


def _dense_backward(xc_BD, W_ND, needs, g_BN):
    need_x, need_W, need_pre, need_b = needs[:4]
    grad_x = grad_W = grad_pre = grad_b = None
    if need_W:  # the one big matmul; under autocast it runs in bf16 like the forward
        grad_W = g_BN.t() @ xc_BD
    with torch.autocast(device_type=g_BN.device.type, enabled=False):
        g_N = g_BN.sum(0, dtype=torch.float32)
        if need_pre:
            grad_pre = -(g_N @ W_ND.float())
        if need_b:
            grad_b = g_N
        if need_x:
            grad_x = g_BN.float() @ W_ND.float()
    return grad_x, grad_W, grad_pre, grad_b


def _sparse_weight_grad(g_BK: torch.Tensor, idx_BK: torch.Tensor, xc_BD: torch.Tensor, n: int) -> torch.Tensor:
    """sum over (i, t) with idx[i, t] = j of g[i, t] * xc[i], for every latent j: B*K*D work, not B*N*D.

    It is the weight gradient of an embedding bag with per-sample weights g and output gradient xc,
    so that kernel computes it.
    """
    with torch.enable_grad():
        W0_ND = torch.zeros(n, xc_BD.shape[1], dtype=xc_BD.dtype, device=xc_BD.device, requires_grad=True)
        out_BD = F.embedding_bag(idx_BK, W0_ND, per_sample_weights=g_BK.to(xc_BD.dtype), mode="sum")
        (grad_ND,) = torch.autograd.grad(out_BD, W0_ND, xc_BD)
    return grad_ND


class _EncodeTopK(torch.autograd.Function):
    """(vals_BK, idx_BK, z_BN): the affine encoder and its k largest entries, in one op.

    When the loss uses only the kept values (no regularizer, no AuxK on z), the gradient of z is zero
    outside the B*K kept entries and the backward never forms a B x N matrix: the weight gradient is
    a gather-accumulate of K rows per input instead of a B x N x D matmul. When z itself is used, its
    gradient is dense and the backward is that of ``_Encode``.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x_BD, W_ND, b_pre_D, b_N, k):
        ctx.set_materialize_grads(False)
        xc_BD = x_BD - b_pre_D
        z_BN = F.linear(xc_BD, W_ND, b_N)
        vals_BK, idx_BK = z_BN.topk(k, dim=1, sorted=False)
        ctx.mark_non_differentiable(idx_BK)
        ctx.save_for_backward(xc_BD, W_ND, idx_BK)
        return vals_BK, idx_BK, z_BN

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_vals_BK, _g_idx, g_z_BN):
        xc_BD, W_ND, idx_BK = ctx.saved_tensors
        need_x, need_W, need_pre, need_b, _ = ctx.needs_input_grad
        n = W_ND.shape[0]
        if g_vals_BK is None and g_z_BN is None:
            return None, None, None, None, None
        if g_z_BN is None:
            g_K = g_vals_BK.float()
            grad_W = _sparse_weight_grad(g_K, idx_BK, xc_BD.float(), n) if need_W else None
            with torch.autocast(device_type=xc_BD.device.type, enabled=False):
                g_N = torch.zeros(n, dtype=torch.float32, device=g_K.device).index_add_(0, idx_BK.reshape(-1),
                                                                                          g_K.reshape(-1))
                grad_x = gather_decode(g_K, idx_BK, W_ND.float()) if need_x else None
        else:
            g_BN = g_z_BN if g_vals_BK is None else g_z_BN.scatter_add(1, idx_BK, g_vals_BK.to(g_z_BN.dtype))
            return (*_dense_backward(xc_BD, W_ND, ctx.needs_input_grad, g_BN), None)
        grad_pre = -(g_N @ W_ND.float()) if need_pre else None
        return grad_x, grad_W, grad_pre, g_N if need_b else None, None


def encode_topk(x_BD, W_ND, b_pre_D, b_N, k: int):
    """(vals_BK, idx_BK, z_BN) of z = (x - b_pre) W^T + b; see _EncodeTopK."""
    return _EncodeTopK.apply(x_BD, W_ND, b_pre_D, b_N, k)


def encode_affine(x_BD: torch.Tensor, W_ND: torch.Tensor, b_pre_D: torch.Tensor, b_N: torch.Tensor) -> torch.Tensor:
    return _Encode.apply(x_BD, W_ND, b_pre_D, b_N)


# From K = N / DENSE_DECODE_DIVISOR kept latents per row on, one dense B x N x D matmul beats gathering K rows:
# embedding_bag's backward is level-1 BLAS (a dot and an axpy per kept entry). Forward + backward on one CPU
# thread (`bench/train.py --decode`, BENCHMARKS.md): gathered is 0.6-0.8x the dense time at K = N/16,
# 2.0-2.3x at N/8, 3-4x at N/4 (AuxK's k_aux = d/2 with a 2x expansion).
DENSE_DECODE_DIVISOR = 10


def gather_decode(acts_BK: torch.Tensor, idx_BK: torch.Tensor, W_ND: torch.Tensor) -> torch.Tensor:
    """sum_k acts_BK[:, k] * W_ND[idx_BK[:, k]]: gradients reach both acts_BK and W_ND.

    Gathered rows while K < N / DENSE_DECODE_DIVISOR, else the code scattered into B x N and one matmul
    (the same sum in another order; repeated indices add up either way)."""
    acts_BK = acts_BK.to(W_ND.dtype)
    if idx_BK.shape[1] * DENSE_DECODE_DIVISOR >= W_ND.shape[0]:
        a_BN = acts_BK.new_zeros(idx_BK.shape[0], W_ND.shape[0]).scatter_add(1, idx_BK, acts_BK)
        return a_BN @ W_ND
    return F.embedding_bag(idx_BK, W_ND, per_sample_weights=acts_BK, mode="sum")


@torch.no_grad()
def geometric_median(x_BD: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's iteration in float64: the point minimising the sum of distances to the rows."""
    x = x_BD.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        moved = (y_new - y).norm() / y.norm().clamp_min(1e-12)
        y = y_new
        if moved < tol:
            break
    return y.to(x_BD.dtype)


def batch_mean(t_B: torch.Tensor) -> torch.Tensor:
    """Mean over the whole batch; under torch.distributed the batch spans ranks.

    The value is the global mean; the gradient is that of the local mean, which is what each rank must
    contribute when the loop averages gradients over ranks.
    """
    local = t_B.mean()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    total = torch.stack([t_B.detach().sum().float(), t_B.new_tensor(t_B.numel(), dtype=torch.float32)])
    torch.distributed.all_reduce(total)
    return local + (total[0] / total[1]).to(local.dtype) - local.detach()


class DictionarySAE(SparseAutoencoder):
    """Shared parameters, encoder, gather decoder, decoder-norm maintenance and scale folding."""

    unit_norm_decoder = True  # ReLU (Anthropic's recipe) turns this off and penalises by row norm instead
    uses_auxk = True
    decoder_init_norm = 1.0

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        assert cfg.d_in >= 1 and cfg.n_latents >= 1, f"bad sizes d_in={cfg.d_in} n_latents={cfg.n_latents}"
        n, d = cfg.n_latents, cfg.d_in
        # Directions uniform on the sphere; encoder tied to the decoder at init (W_enc = W_dec^T in x @ W form).
        W_dec_ND = torch.randn(n, d)
        W_dec_ND *= self.decoder_init_norm / W_dec_ND.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_ND)
        self.W_enc = nn.Parameter(W_dec_ND.clone())
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))

    # --- the interface ---------------------------------------------------------------------------
    def encode_pre(self, x_BD: torch.Tensor) -> torch.Tensor:
        assert x_BD.ndim == 2 and x_BD.shape[1] == self.cfg.d_in, \
            f"expected inputs [B, {self.cfg.d_in}], got {list(x_BD.shape)}"
        return encode_affine(x_BD, self.W_enc, self.b_dec, self.b_enc)

    def decode(self, acts_BK: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        return gather_decode(acts_BK, idx_BK, self.W_dec) + self.b_dec

    def decode_latents(self, acts_BK: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        return gather_decode(acts_BK, idx_BK, self.W_dec)

    def decode_dense(self, a_BN: torch.Tensor) -> torch.Tensor:
        """x_hat_BD from a dense B x N code: one matmul, equal to ``decode`` of its nonzero entries (cheaper
        when many latents fire, as in training codes padded to K = N)."""
        return a_BN.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def _check_k(self, k: int) -> int:
        k = int(k)
        assert 1 <= k <= self.cfg.n_latents, f"k={k} must be in [1, n_latents={self.cfg.n_latents}]"
        return k

    def plain_topk(self, a_BN: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """``sparsify``'s answer when a k is given: the k largest entries of a_BN, whatever the variant's
        own rule (``model(x, k=k')`` compares variants at one sparsity)."""
        vals_BK, idx_BK = a_BN.topk(self._check_k(k), dim=1, sorted=False)
        return vals_BK, idx_BK, None

    # --- exports -----------------------------------------------------------------------------------
    def saelens_weights(self) -> dict[str, torch.Tensor]:
        """The four tensors under SAELens' names and layouts (it encodes (x - b_dec) @ W_enc + b_enc)."""
        return {"W_enc": self.W_enc.detach().t().contiguous(), "W_dec": self.W_dec.detach().contiguous(),
                "b_enc": self.b_enc.detach().contiguous(), "b_dec": self.b_dec.detach().contiguous()}

    # --- training hooks --------------------------------------------------------------------------
    def init_from_sample(self, x_BD: torch.Tensor) -> None:
        with torch.no_grad():
            self.b_dec.copy_(geometric_median(x_BD.to(self.b_dec.device)).to(self.b_dec.dtype))

    @torch.no_grad()
    def prepare_grads(self) -> None:
        # With unit-norm rows, the component of the gradient along a row only changes its norm, which
        # the renormalisation undoes; removing it keeps Adam's moments about directions only.
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            W, G = self.W_dec, self.W_dec.grad
            G -= (G * W).sum(1, keepdim=True) * W

    @torch.no_grad()
    def after_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        # Trained on x' = s x. Dividing both biases by s makes z = z'/s; Top-k, ReLU and any threshold
        # compare values of one input, so the support is unchanged, the kept values are z'/s, and
        # W_dec (z'/s) + b_dec/s = x_hat'/s. The decoder keeps unit-norm rows; activations come out in
        # raw units.
        assert scale > 0, f"input scale must be positive, got {scale}"
        self.b_enc /= scale
        self.b_dec /= scale
