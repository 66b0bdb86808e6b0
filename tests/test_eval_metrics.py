"""Float64 reconstruction and sparsity accumulators against direct numpy definitions."""

import math

import numpy as np
import pytest
import torch

from visionsae.evaluate.metrics import (DENSE_FRACTION, ReconAccumulator, SparsityAccumulator, code_concentration,
                                        density_histogram, k_distribution)


def _direct(x, xh):
    x, xh = x.astype(np.float64), xh.astype(np.float64)
    err = ((x - xh) ** 2).sum(1)
    fvu = err.sum() / ((x - x.mean(0)) ** 2).sum()
    nx, nh = np.linalg.norm(x, axis=1), np.linalg.norm(xh, axis=1)
    return {"mse": err.mean() / x.shape[1], "fvu": fvu, "explained_variance": 1 - fvu,
            "nmse": (err / nx ** 2).mean(), "cosine": ((x * xh).sum(1) / (nx * nh)).mean(),
            "l2_ratio": (nh / nx).mean(), "rel_bias": (nh ** 2).sum() / (x * xh).sum()}


def test_recon_matches_definitions_over_uneven_batches():
    rng = np.random.default_rng(0)
    # a large common offset: the naive E||x||^2 - ||E x||^2 would lose digits in float32
    x = (rng.normal(size=(1000, 12)) + 300).astype(np.float32)
    xh = (x + rng.normal(scale=0.5, size=x.shape)).astype(np.float32)
    acc = ReconAccumulator(x.astype(np.float64).mean(0) + 1.0)  # a centre that is not the exact mean
    for a, b in [(0, 7), (7, 300), (300, 301), (301, 1000)]:
        acc.update(torch.from_numpy(x[a:b]), torch.from_numpy(xh[a:b]))
    got, want = acc.result(), _direct(x, xh)
    assert got["n_rows"] == 1000 and got["n_zero_rows"] == 0
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-10), key


def test_recon_perfect_and_zero_rows():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-3.0, 1.0]])
    acc = ReconAccumulator(np.zeros(2))
    acc.update(x, x.clone())
    r = acc.result()
    assert r["fvu"] == 0 and r["mse"] == 0 and r["explained_variance"] == 1
    assert r["cosine"] == pytest.approx(1.0) and r["l2_ratio"] == pytest.approx(1.0) and r["rel_bias"] == 1.0
    assert r["n_zero_rows"] == 1  # the zero row is left out of the per-row ratios


def test_code_concentration_by_hand():
    z = torch.tensor([[3.0, 1.0, -5.0, 0.0],   # z+ = (3, 1, 0, 0): l1 4, l2 sqrt(10); 90% of 4 needs both
                      [1.0, 1.0, 1.0, 1.0],    # l1/l2 = 4 / 2 = 2; 3.6 of 4 needs all four
                      [-1.0, -2.0, -3.0, -4.0],  # no positive part: NaN
                      [9.0, 1.0, 0.0, 0.0]])   # 9 >= 0.9 * 10: one latent
    ratio, n_mass = code_concentration(z)
    assert ratio[0].item() == pytest.approx(4 / math.sqrt(10)) and ratio[1].item() == pytest.approx(2.0)
    assert n_mass.tolist()[:2] == [2.0, 4.0] and n_mass[3].item() == 1.0
    assert math.isnan(ratio[2].item()) and math.isnan(n_mass[2].item())


def test_sparsity_counts_dead_dense_and_l0():
    n_lat = 6
    acc = SparsityAccumulator(n_lat)
    # 20 rows: latent 0 fires on every row, latent 1 on one row, latent 2 on 2 rows, 3..5 never
    idx = torch.zeros(20, 2, dtype=torch.long)
    acts = torch.zeros(20, 2)
    acts[:, 0] = 1.0
    idx[0, 1], acts[0, 1] = 1, 0.5
    idx[1:3, 1], acts[1:3, 1] = 2, 2.0
    z = torch.randn(20, n_lat)
    acc.update(z[:10], acts[:10], idx[:10], None)
    acc.update(z[10:], acts[10:], idx[10:], None)
    r = acc.result()
    assert r["l0"] == pytest.approx((20 + 3) / 20)
    assert r["dead"] == 3 and r["dead_fraction"] == pytest.approx(0.5)
    # densities 1.0, 0.05, 0.1: only latent 0 exceeds the 10% threshold
    assert DENSE_FRACTION == 0.1 and r["dense"] == 1
    assert sum(r["density_histogram"]["counts"]) == 3
    assert "k_distribution" not in r


def test_density_histogram_covers_one_firing_to_always():
    h = density_histogram(np.array([1 / 1000, 0.5, 1.0]), 1000)
    assert h["log10_edges"][0] <= -3 and h["log10_edges"][-1] == pytest.approx(0.0)
    assert sum(h["counts"]) == 3


def test_k_distribution_summary():
    k = np.array([2.0, 2.5, 3.0, 3.9, 8.0])
    d = k_distribution(k)
    assert d["mean"] == pytest.approx(k.mean()) and d["median"] == 3.0 and d["min"] == 2.0 and d["max"] == 8.0
    assert d["hist_edges"][0] == 2 and sum(d["hist_counts"]) == 5 and d["hist_counts"][0] == 2  # 2.0, 2.5 in [2, 3)
