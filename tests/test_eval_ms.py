"""Linear-time Monosemanticity Score against the O(N^2) definition and a case worked by hand."""

import math

import numpy as np
import pytest
import torch

from visionsae.evaluate.codes import ImageCodes
from visionsae.evaluate.monosemanticity import MSAccumulator, ms_linear, ms_quadratic, summarize


def _sparse_acts(rng, n_img, n_lat, p):
    return rng.exponential(size=(n_img, n_lat)) * (rng.random((n_img, n_lat)) < p)


def test_linear_equals_quadratic_on_random_data():
    rng = np.random.default_rng(0)
    a = _sparse_acts(rng, 120, 30, 0.2)
    a[:, 3] += 1.5  # fires everywhere: min > 0, exercises the min-max expansion
    a[:, 4] = 0.0  # dead: undefined
    e = rng.normal(size=(120, 9))
    want, got = ms_quadratic(a, e), ms_linear(a, e)
    assert np.array_equal(np.isnan(want), np.isnan(got)) and np.isnan(got[4])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_hand_worked_case():
    # a = (1, 2, 3, 5) -> a~ = (0, 1/4, 1/2, 1). Embeddings: images 1 and 3 point the same way, image 2
    # is orthogonal to both. Pairs with weight: (1,2): 1/8, cos 0; (1,3): 1/4, cos 1; (2,3): 1/2, cos 0.
    # MS = (1/4) / (1/8 + 1/4 + 1/2) = 2/7.
    a = np.array([[1.0], [2.0], [3.0], [5.0]])
    e = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [5.0, 0.0]])  # norms are irrelevant: unit-normalised
    assert ms_linear(a, e)[0] == pytest.approx(2 / 7)
    assert ms_quadratic(a, e)[0] == pytest.approx(2 / 7)


def test_identical_embeddings_give_one_and_single_image_is_undefined():
    rng = np.random.default_rng(1)
    a = _sparse_acts(rng, 50, 4, 0.5)
    a[:, 1] = 0.0
    a[7, 1] = 2.0  # fires on one image only: no pair, MS undefined
    e = np.tile([[0.6, 0.8]], (50, 1))
    ms = ms_linear(a, e)
    assert ms[0] == pytest.approx(1.0) and math.isnan(ms[1])
    assert summarize(ms) == {"mean": pytest.approx(1.0), "median": pytest.approx(1.0), "n_latents": 3}


def test_batched_accumulation_equals_one_pass():
    rng = np.random.default_rng(2)
    a, e = _sparse_acts(rng, 200, 16, 0.3), rng.normal(size=(200, 5))
    acc = MSAccumulator(16, 5)
    for lo, hi in [(0, 1), (1, 60), (60, 199), (199, 200)]:
        acc.update(ImageCodes.from_dense(torch.from_numpy(a[lo:hi]).float()), torch.from_numpy(e[lo:hi]))
    np.testing.assert_allclose(acc.result(), ms_quadratic(a.astype(np.float32), e), rtol=1e-9)


def test_affine_change_of_activations_leaves_ms_unchanged():
    # min-max normalisation makes MS invariant to a positive scale and a shift of a latent's activations
    rng = np.random.default_rng(3)
    a, e = _sparse_acts(rng, 80, 5, 0.4), rng.normal(size=(80, 6))
    np.testing.assert_allclose(ms_linear(3.0 * a + 0.5, e), ms_linear(a, e), rtol=1e-9)


def test_sparse_product_backends_agree():
    from visionsae.evaluate.monosemanticity import sparse_at_e
    rng = np.random.default_rng(4)
    a = torch.from_numpy(_sparse_acts(rng, 30, 12, 0.3))
    e = torch.from_numpy(rng.normal(size=(30, 4)))
    codes = ImageCodes.from_dense(a)
    want = a.T @ e
    for backend in ("auto", "torch"):
        got = sparse_at_e(codes.lat_P, codes.img_P, codes.val_P, e, 12, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_baseline_is_mean_pairwise_cosine():
    rng = np.random.default_rng(6)
    e = rng.normal(size=(25, 3)) + 1.0
    acc = MSAccumulator(2, 3)
    a = torch.ones(25, 2, dtype=torch.float64)
    a[:, 1] = torch.from_numpy(rng.random(25))
    acc.update(ImageCodes.from_dense(a), torch.from_numpy(e))
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    cos = u @ u.T
    want = cos[np.triu_indices(25, 1)].mean()
    assert acc.baseline() == pytest.approx(want, rel=1e-12)
    # a latent whose activations are all equal has r = 0: MS undefined rather than the baseline
    assert math.isnan(acc.result()[0])
