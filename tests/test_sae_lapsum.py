"""The LapSum soft top-k: the closed-form threshold against bisection, its gradients, its limits."""

from __future__ import annotations

import pytest
import torch

from visionsae.sae.lapsum import laplace_cdf, lapsum_threshold, soft_topk_mask

torch.set_num_threads(1)


def _bisect(s_N: torch.Tensor, k: float) -> float:
    lo, hi = float(s_N.min()) - 60, float(s_N.max()) + 60
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(laplace_cdf(s_N - mid).sum()) > k else (lo, mid)
    return (lo + hi) / 2


def test_threshold_matches_bisection():
    torch.manual_seed(0)
    s_BN = torch.randn(6, 40, dtype=torch.double) * 4
    k_B = torch.tensor([0.2, 1.0, 3.3, 17.5, 39.0, 39.9], dtype=torch.double)
    b_B = lapsum_threshold(s_BN, k_B)
    for i in range(6):
        assert abs(float(b_B[i]) - _bisect(s_BN[i], float(k_B[i]))) < 1e-9


def test_mask_sums_to_k_at_tiny_temperature_and_ties():
    torch.manual_seed(1)
    h_BN = torch.randn(32, 2048).relu()  # half the entries tie at exactly 0, as after a ReLU encoder
    k_B = torch.rand(32) * 300 + 1
    for alpha in (1.0, 1e-2, 1e-4):
        m_BN = soft_topk_mask(h_BN, k_B, alpha)
        assert torch.isfinite(m_BN).all() and (m_BN >= 0).all() and (m_BN <= 1).all()
        assert torch.allclose(m_BN.sum(1), k_B, rtol=1e-4, atol=1e-2)


def test_small_temperature_approaches_hard_topk():
    torch.manual_seed(2)
    h_BN = torch.randn(4, 100, dtype=torch.double)
    m_BN = soft_topk_mask(h_BN, torch.full((4,), 10.0, dtype=torch.double), 1e-5)
    hard_BN = torch.zeros_like(h_BN).scatter(1, h_BN.topk(10, dim=1).indices, 1.0)
    assert torch.allclose(m_BN, hard_BN, atol=1e-6)


def test_gradients_reach_k_and_scores():
    torch.manual_seed(3)
    h_BN = torch.randn(3, 15, dtype=torch.double, requires_grad=True)
    k_B = torch.tensor([2.3, 6.1, 11.7], dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, k: soft_topk_mask(h, k, 0.4), (h_BN, k_B))
    # d(sum_j m_j) / dk = 1 exactly, since the sum IS k.
    soft_topk_mask(h_BN, k_B, 0.05).sum().backward()
    assert torch.allclose(k_B.grad, torch.ones(3, dtype=torch.double))


def _fd_grads(h64_BN, k64_B, alpha, c_BN, coords, step):
    """Central float64 finite differences of L = sum(m * c) at the given (row, col) coords and in k."""
    def loss(h, k):
        return float((soft_topk_mask(h, k, alpha) * c_BN).sum())
    g_h = []
    for i, j in coords:
        hp, hm = h64_BN.clone(), h64_BN.clone()
        hp[i, j] += step
        hm[i, j] -= step
        g_h.append((loss(hp, k64_B) - loss(hm, k64_B)) / (2 * step))
    g_k = []
    for i in range(k64_B.shape[0]):
        kp, km = k64_B.clone(), k64_B.clone()
        kp[i] += 1e-4
        km[i] -= 1e-4
        g_k.append((loss(h64_BN, kp) - loss(h64_BN, km)) / 2e-4)
    return torch.tensor(g_h, dtype=torch.double), torch.tensor(g_k, dtype=torch.double)


@pytest.mark.parametrize("alpha", [1e-4 * 768 ** 0.5, 1e-4])
def test_float32_backward_matches_float64_finite_differences(alpha):
    """As trained: float32 scores of a ReLU encoder (O(1) at E||x||^2 = d), 2048 latents, k ~ 32, at the
    training temperature (the reference's 1e-4 in this project's units for d = 768) and at 1e-4."""
    torch.manual_seed(5)
    h32_BN = torch.randn(3, 2048).relu()
    k32_B = torch.tensor([17.3, 32.5, 60.8])
    c_BN = torch.randn(3, 2048, dtype=torch.double)
    h = h32_BN.clone().requires_grad_(True)
    k = k32_B.clone().requires_grad_(True)
    (soft_topk_mask(h, k, alpha) * c_BN.float()).sum().backward()
    # the coordinates that carry gradient (nearest the threshold in each row) and a few others
    h64, k64 = h32_BN.double(), k32_B.double()
    with torch.no_grad():
        m_BN = soft_topk_mask(h64, k64, alpha)
    near = (m_BN - 0.5).abs().topk(12, dim=1, largest=False).indices
    coords = [(i, int(j)) for i in range(3) for j in near[i]] + [(0, 5), (1, 100), (2, 2000)]
    g_h, g_k = _fd_grads(h64, k64, alpha, c_BN, coords, step=1e-4 * alpha)
    got_h = torch.tensor([float(h.grad[i, j]) for i, j in coords], dtype=torch.double)
    assert g_h.abs().max() > 0
    assert (got_h - g_h).norm() <= 5e-3 * g_h.norm(), (got_h, g_h)  # autograd through b: 4% at alpha 1e-4
    assert torch.allclose(k.grad.double(), g_k, rtol=1e-2, atol=1e-4 * g_k.abs().max())


def test_threshold_with_a_bound_on_k_matches_bisection():
    """k_bound sorts only the top 2 k_bound + 1 scores: the threshold is still the exact one."""
    torch.manual_seed(5)
    s_BN = torch.randn(6, 200, dtype=torch.double) * 4
    k_B = torch.tensor([0.2, 1.0, 3.3, 7.5, 11.9, 12.0], dtype=torch.double)
    b_B = lapsum_threshold(s_BN, k_B, k_bound=12.0)
    for i in range(6):
        assert abs(float(b_B[i]) - _bisect(s_BN[i], float(k_B[i]))) < 1e-9


@pytest.mark.parametrize("alpha", [0.5, 1e-4])
def test_mask_and_gradients_with_a_bound_equal_the_full_sort_in_float32(alpha):
    """SoftSAE's call (k_bound = k_max, float32, ReLU ties at 0, alpha as small as training's) gives the
    mask and the gradients of the sort of every row."""
    torch.manual_seed(6)
    h_BN = torch.randn(64, 1536).relu() * 3
    k_B = (torch.rand(64) * 31 + 1).requires_grad_()
    c_BN = torch.randn(64, 1536)
    outs = []
    for bound in (None, 32.0):
        h = h_BN.clone().requires_grad_()
        k = k_B.detach().clone().requires_grad_()
        m_BN = soft_topk_mask(h, k, alpha, k_bound=bound)
        g_h, g_k = torch.autograd.grad((m_BN * c_BN).sum(), (h, k))
        outs.append((m_BN, g_h, g_k))
    for bounded, full in zip(outs[1], outs[0]):
        torch.testing.assert_close(bounded, full, rtol=1e-4, atol=1e-5)
