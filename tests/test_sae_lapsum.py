"""The LapSum soft top-k: the closed-form threshold against bisection, its gradients, its limits."""

from __future__ import annotations

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
