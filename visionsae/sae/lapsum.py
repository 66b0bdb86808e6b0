"""LapSum soft top-k (Struski et al., ICML 2025), in closed form on the sorted input, batched.

For scores h_BN, a target count k_B and a temperature alpha, the soft mask is

    m_j = F((h_j - b) / alpha),   F the Laplace CDF: F(t) = e^t / 2 (t <= 0), 1 - e^-t / 2 (t > 0),

with the threshold b chosen so that sum_j m_j = k. Work in s = h / alpha and b' = b / alpha, with the
scores sorted descending s_(1) >= ... >= s_(n). If exactly r scores lie above b', then

    sum_j F(s_j - b') = r - (u / 2) A_r + C_r / (2 u),  u = e^{b'},
    A_r = sum_{j <= r} e^{-s_(j)},  C_r = sum_{j > r} e^{s_(j)},

so sum = k is the quadratic A_r u^2 - 2 (r - k) u - C_r = 0, whose positive root is
u = ((r - k) + sqrt((r - k)^2 + A_r C_r)) / A_r (and u = C_0 / (2k) when r = 0). The right r is where
the sum evaluated AT b' = s_(r), G_r, first exceeds k (G is non-decreasing in r). Everything is done
in the log domain (s can be ~1e4 for alpha = 1e-4): log A_r and log C_r are cumulative logsumexps,
and G_r only needs exponentials of non-positive numbers.

The backward is written in closed form, not taken by autograd through the threshold's formula (whose
terms are ~s large and cancel: in float32 at s ~ 1e4 autograd's dL/dh was off by 40% to 500%).
Differentiating sum_j F(s_j - b) = k gives db/ds_j = p_j / P and db/dk = -1 / P, with p_j = F'(s_j - b)
= exp(-|s_j - b|) / 2 and P = sum_j p_j, so for an upstream gradient v = dL/dm

    dL/ds_j = p_j (v_j - v_bar),   dL/dk = v_bar,   v_bar = sum_j p_j v_j / P,

where only differences s_j - b (O(1) near the threshold) and a normalised weighted mean appear.
"""

from __future__ import annotations

import math

import torch

_LOG2 = math.log(2.0)
_BIG = 15.0  # beyond this, asinh(w) = log(2w) to within e^-30


def laplace_cdf(t: torch.Tensor) -> torch.Tensor:
    half_e = 0.5 * torch.exp(-t.abs())  # one exponential for both branches, never overflowing
    return torch.where(t <= 0, half_e, 1 - half_e)


def lapsum_threshold(s_BN: torch.Tensor, k_B: torch.Tensor, k_bound: float | None = None) -> torch.Tensor:
    """b'_B solving sum_j F(s_Bj - b'_B) = k_B, for 0 < k < n (clamped inside that range).

    ``k_bound`` >= every k_B (SoftSAE's k_max) makes it O(n) instead of a sort of every row: each score above
    the threshold carries F > 1/2 of the sum k, so at most 2k of them lie above it. Only the top
    m = 2 ceil(k_bound) + 1 are sorted; the others enter only through their total sum e^{s_j} (in C_r)."""
    B, n = s_BN.shape
    k_B = k_B.to(s_BN.dtype).clamp(1e-3, n - 1e-3)
    m = n if k_bound is None else min(n, 2 * math.ceil(k_bound) + 1)
    if m < n:
        s_sorted, top_BM = s_BN.topk(m, dim=1, sorted=True)  # position p holds s_(p+1), p < m
        log_tail = s_BN.scatter(1, top_BM, float("-inf")).logsumexp(1, keepdim=True)  # log sum_{j > m} e^{s_(j)}
    else:
        s_sorted, _ = s_BN.sort(dim=1, descending=True)  # position p holds s_(p+1)
        log_tail = torch.full((B, 1), float("-inf"), dtype=s_BN.dtype, device=s_BN.device)
    logA = torch.logcumsumexp(-s_sorted, dim=1)  # [:, r-1] = log A_r, r = 1..m
    # [:, p] = log sum_{j >= p+1} e^{s_(j)}, the scores past the sorted m included
    logC_all = torch.logaddexp(torch.logcumsumexp(s_sorted.flip(1), dim=1).flip(1), log_tail)
    logC = torch.cat([logC_all[:, 1:], log_tail], dim=1)  # [:, r-1] = log C_r, r = 1..m

    r_N = torch.arange(1, m + 1, dtype=s_BN.dtype, device=s_BN.device)
    with torch.no_grad():
        # G_r = g(s_(r)); s_(r) + log A_r <= log r and log C_r - s_(r) <= log(n - r): no overflow.
        G_BN = r_N - 0.5 * torch.exp(s_sorted + logA) + 0.5 * torch.exp(logC - s_sorted)
        r_B = (G_BN <= k_B[:, None]).sum(1)  # number of scores above the threshold, 0..m

    at = (r_B - 1).clamp_min(0)[:, None]
    logA_r = logA.gather(1, at).squeeze(1)
    logC_r = torch.where(r_B > 0, logC.gather(1, at).squeeze(1), logC_all[:, 0])  # C_0 = sum of all
    q_B = r_B.to(s_BN.dtype) - k_B

    # log(q + sqrt(q^2 + e^P)) with P = log(A C), stably for every sign and size of q and P:
    # = P/2 + asinh(q e^{-P/2}); for |q| e^{-P/2} > e^15 use asinh's logarithmic limit, written so
    # that P cancels analytically where it can be -inf (r = n, C_n = 0).
    P_B = (logA_r + logC_r).clamp_min(-1e30)
    q_abs = torch.where(q_B == 0, torch.ones_like(q_B), q_B.abs())
    lw_B = torch.log(q_abs) - 0.5 * P_B
    w_B = torch.where(q_B == 0, torch.zeros_like(q_B), torch.sign(q_B) * torch.exp(lw_B.clamp_max(_BIG)))
    L_small = 0.5 * P_B + torch.asinh(w_B)
    L_big = torch.where(q_B > 0, _LOG2 + torch.log(q_abs), P_B - _LOG2 - torch.log(q_abs))
    L_B = torch.where((q_B != 0) & (lw_B > _BIG), L_big, L_small)

    logA_safe = torch.where(r_B > 0, logA_r, torch.zeros_like(logA_r))
    logu_r = L_B - logA_safe
    logu_0 = logC_all[:, 0] - torch.log(2 * k_B)
    return torch.where(r_B > 0, logu_r, logu_0)


class _LapSumMask(torch.autograd.Function):
    """m_BN = F(s_BN - b_B) with sum_j m_Bj = k_B, and the closed-form backward of the module docstring."""

    @staticmethod
    def forward(ctx, s_BN, k_B, k_bound):
        with torch.no_grad():
            t_BN = s_BN - lapsum_threshold(s_BN, k_B, k_bound)[:, None]
            n = s_BN.shape[1]
            inside_B = (k_B > 1e-3) & (k_B < n - 1e-3)  # lapsum_threshold clamps k to this range: no gradient outside
        ctx.save_for_backward(t_BN, inside_B)
        ctx.k_dtype = k_B.dtype
        return laplace_cdf(t_BN)

    @staticmethod
    def backward(ctx, v_BN):
        t_BN, inside_B = ctx.saved_tensors
        logp_BN = -t_BN.abs() - _LOG2
        # v_bar with weights normalised by the row's largest p: no underflow when every p is tiny
        w_BN = torch.exp(logp_BN - logp_BN.amax(1, keepdim=True))
        vbar_B = (w_BN * v_BN).sum(1) / w_BN.sum(1)
        g_s = torch.exp(logp_BN) * (v_BN - vbar_B[:, None]) if ctx.needs_input_grad[0] else None
        g_k = torch.where(inside_B, vbar_B, 0.0).to(ctx.k_dtype) if ctx.needs_input_grad[1] else None
        return g_s, g_k, None


def soft_topk_mask(h_BN: torch.Tensor, k_B: torch.Tensor, alpha: float | torch.Tensor,
                   k_bound: float | None = None) -> torch.Tensor:
    """m_BN in (0, 1) with sum_j m_Bj = k_B: a soft version of the indicator of the k largest h.
    ``k_bound``: an upper bound on k_B, which spares sorting each row (see ``lapsum_threshold``)."""
    assert h_BN.ndim == 2 and k_B.shape == (h_BN.shape[0],), \
        f"expected h [B, n] and k [B], got {list(h_BN.shape)} and {list(k_B.shape)}"
    return _LapSumMask.apply(h_BN / alpha, k_B, k_bound)
