"""Class purity and small-budget probes on tiny labelled sets whose answers are known."""

import math

import numpy as np
import pytest
import torch

from visionsae.evaluate.codes import ImageCodes, top_per_group
from visionsae.evaluate.probes import TopCodes, budget_matrix, chance_accuracy, check_labels, run_probes
from visionsae.evaluate.purity import ClassCounts, TopImages, purity_from_counts, purity_top, summarize, top_class


def test_purity_known_answers():
    # 8 images, classes 0 0 0 0 1 1 2 2; three latents
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    a = torch.zeros(8, 4)
    a[0:4, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # latent 0: only class 0 -> purity 1
    a[[0, 1, 2, 4], 1] = torch.tensor([1.0, 2.0, 3.0, 9.0])  # latent 1: 3 of class 0, 1 of class 1 -> 0.75
    a[[4, 6], 2] = torch.tensor([5.0, 1.0])  # latent 2: one of class 1, one of class 2 -> 0.5
    # latent 3 never fires -> undefined
    counts = ClassCounts(4, 3)
    top = TopImages(4, top_m=2)
    slots = torch.arange(8)
    for part in (slice(0, 3), slice(3, 8)):  # two batches
        codes = ImageCodes.from_dense(a[part])
        counts.update(codes, labels[part])
        top.update(codes, slots[part])
    c = counts.result()
    assert c.tolist() == [[4, 0, 0], [3, 1, 0], [0, 1, 1], [0, 0, 0]]
    pur = purity_from_counts(c)
    assert pur[:3].tolist() == [1.0, 0.75, 0.5] and math.isnan(pur[3])
    assert top_class(c).tolist() == [0, 0, 1, -1]
    vals, top_slots = top.result()
    assert top_slots[1].tolist() == [4, 2]  # latent 1's two largest: image 4 (class 1), image 2 (class 0)
    pt = purity_top(vals, labels.numpy()[top_slots], 3)
    assert pt[:3].tolist() == [1.0, 0.5, 0.5] and math.isnan(pt[3])
    live = np.array([True, True, True, False])
    assert summarize(pur, live) == {"mean": pytest.approx(0.75), "median": 0.75, "n_latents": 3}


def test_purity_needs_two_firing_images_like_ms():
    """A latent firing on one image (purity 1 by construction) is left out of every average, as MS leaves it."""
    from visionsae.evaluate.monosemanticity import ms_linear
    counts = np.array([[1, 0], [3, 1], [0, 2]])
    pur = purity_from_counts(counts)
    assert math.isnan(pur[0]) and pur[1:].tolist() == [0.75, 1.0]
    assert summarize(pur, np.ones(3, bool)) == {"mean": pytest.approx(0.875), "median": 0.875, "n_latents": 2}
    assert math.isnan(purity_top(np.array([[5.0, 0.0]]), np.array([[1, 0]]), 2)[0])
    # the MS of a latent firing on one image is undefined too
    a = np.zeros((4, 2))
    a[0, 0], a[1:3, 1] = 1.0, [1.0, 2.0]
    ms = ms_linear(a, np.random.default_rng(0).standard_normal((4, 3)))
    assert math.isnan(ms[0]) and not math.isnan(ms[1])


def test_purity_top_ignores_non_firing_and_unlabelled():
    vals = np.array([[3.0, 2.0, 1.0, 0.0]])  # only three images fire
    labels = np.array([[1, -1, 1, 0]])  # the second is unlabelled
    assert purity_top(vals, labels, 2).tolist() == [1.0]


def _codes(rng, y, n_lat, signal_rank):
    """Each image's class c is latent c, placed at rank ``signal_rank`` under larger noise latents."""
    n, n_cls = len(y), int(y.max()) + 1
    a = np.zeros((n, n_lat), dtype=np.float32)
    for i, c in enumerate(y):
        noise = rng.choice(np.arange(n_cls, n_lat), size=signal_rank, replace=False)
        a[i, noise] = 10.0 + rng.random(signal_rank)  # the larger latents carry no class information
        a[i, c] = 5.0
    return a


def test_probe_budget_known_answers():
    rng = np.random.default_rng(0)
    n_lat, n_cls = 60, 4
    y_tr, y_te = rng.integers(0, n_cls, 400), rng.integers(0, n_cls, 200)
    # the class latent is the 2nd largest: budget 1 sees only noise, budget 2 sees the class
    tc_tr, tc_te = TopCodes(3), TopCodes(3)
    tc_tr.update(ImageCodes.from_dense(torch.from_numpy(_codes(rng, y_tr, n_lat, 1))))
    tc_te.update(ImageCodes.from_dense(torch.from_numpy(_codes(rng, y_te, n_lat, 1))))
    acc = run_probes(tc_tr.result(), y_tr, tc_te.result(), y_te, [1, 2, 3], n_lat, seed=0)
    assert acc[2]["accuracy"] == 1.0 and acc[3]["accuracy"] == 1.0
    chance = chance_accuracy(y_tr, y_te)
    assert acc[1]["accuracy"] < chance + 0.15  # noise only: no better than guessing (with sampling slack)


def test_budget_matrix_keeps_m_largest_and_drops_zeros():
    vals = np.array([[5.0, 3.0, 0.0], [2.0, 1.0, 0.5]], dtype=np.float32)
    idx = np.array([[7, 1, 0], [2, 3, 4]])
    m = budget_matrix(vals, idx, 2, 8).toarray()
    assert m[0].tolist() == [0, 3, 0, 0, 0, 0, 0, 5] and m[1].tolist() == [0, 0, 2, 1, 0, 0, 0, 0]
    assert budget_matrix(vals, idx, 3, 8).nnz == 5  # the zero of row 0 is not stored
    pad_vals, pad_idx = np.array([[4.0, 0.0]], dtype=np.float32), np.array([[3, -1]])  # padding of TopCodes
    assert budget_matrix(pad_vals, pad_idx, 2, 8).toarray()[0].tolist() == [0, 0, 0, 4, 0, 0, 0, 0]


def test_codes_pool_tokens_by_max_and_top_per_group():
    # 2 images x 2 tokens, K = 2 kept per row; zeros are padding
    acts = torch.tensor([[3.0, 1.0], [2.0, 0.0], [0.5, 4.0], [0.0, 0.0]])
    idx = torch.tensor([[0, 1], [1, 2], [0, 2], [3, 4]])
    codes = ImageCodes.from_kept(acts, idx, tokens_per_image=2, n_latents=5)
    assert codes.n_images == 2
    assert codes.dense().tolist() == [[3.0, 2.0, 0.0, 0.0, 0.0], [0.5, 0.0, 4.0, 0.0, 0.0]]
    vals, lat = top_per_group(codes.img_P, codes.val_P, codes.lat_P, 2, 3)
    assert vals.tolist() == [[3.0, 2.0, 0.0], [4.0, 0.5, 0.0]] and lat.tolist() == [[0, 1, -1], [2, 0, -1]]


def test_probe_needs_two_classes():
    assert check_labels(np.zeros(5, int), np.zeros(3, int)) is not None
    assert check_labels(np.array([0, 1]), np.array([], int)) == "no labelled held-out images"
    assert check_labels(np.array([0, 1]), np.array([1])) is None


def test_top_images_and_top_codes_match_brute_force_over_batches():
    rng = np.random.default_rng(5)
    a = rng.exponential(size=(300, 40)) * (rng.random((300, 40)) < 0.2)
    a_t = torch.from_numpy(a).float()
    top, rows, pooled = TopImages(40, top_m=7), TopCodes(5), TopCodes(5)
    for lo in range(0, 300, 64):  # uneven last batch
        part = a_t[lo:lo + 64]
        codes = ImageCodes.from_dense(part)
        top.update(codes, torch.arange(lo, lo + part.shape[0]))
        pooled.update(codes)
        acts, idx = part.topk(12, dim=1)  # an SAE's kept code of these rows
        rows.update_rows(acts, idx)
    vals, slots = top.result()
    for lat in range(40):
        order = np.argsort(-a[:, lat], kind="stable")[:7]
        firing = order[a[order, lat] > 0]
        assert slots[lat, :len(firing)].tolist() == firing.tolist()
        assert (slots[lat, len(firing):] == -1).all() and (vals[lat, len(firing):] == 0).all()
    (v1, i1), (v2, i2) = rows.result(), pooled.result()
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(np.where(v1 > 0, i1, -1), np.where(v2 > 0, i2, -1))
