"""The paper's regularizers against hand-computed values, and where their gradients go."""

from __future__ import annotations

import torch

from visionsae.train.regularizers import batch_active, l1_l2_ratio, off_support_l1

torch.set_num_threads(1)

# Two inputs, five units, Top-2 supports S_0 = {0, 1}, S_1 = {1, 2}: A = {0, 1, 2}.
# Every entry of z is non-zero, so the shortcut A = {j : z_ij != 0} would give all five units.
Z = torch.tensor([[3.0, 2.0, -1.0, 0.5, -4.0],
                  [0.2, 5.0, 4.0, -2.0, 1.0]])
IDX = torch.tensor([[0, 1], [1, 2]])


def test_batch_active_is_the_union_of_supports():
    assert batch_active(IDX, 5).tolist() == [True, True, True, False, False]


def test_off_support_l1_hand_computed():
    # input 0: A minus S_0 = {2}: |-1| = 1;  input 1: A minus S_1 = {0}: |0.2| = 0.2;  mean 0.6
    assert torch.isclose(off_support_l1(Z, IDX), torch.tensor(0.6))


def test_l1_l2_ratio_hand_computed():
    r0 = (3 + 2 + 1) / (9 + 4 + 1) ** 0.5
    r1 = (0.2 + 5 + 4) / (0.04 + 25 + 16) ** 0.5
    assert torch.isclose(l1_l2_ratio(Z, IDX), torch.tensor((r0 + r1) / 2), atol=1e-6)


def test_no_gradient_outside_the_batch_active_set():
    z = Z.clone().requires_grad_()
    (off_support_l1(z, IDX) + l1_l2_ratio(z, IDX)).backward()
    assert torch.all(z.grad[:, 3:] == 0)
    assert torch.all(z.grad[:, :3] != 0)
    # The off-support term alone touches only A minus S_i.
    z.grad = None
    off_support_l1(z, IDX).backward()
    assert z.grad.tolist() == [[0, 0, -0.5, 0, 0], [0.5, 0, 0, 0, 0]]  # sign(z) / B on A minus S_i


def test_padded_supports_and_precomputed_active_set():
    # A row padded with a zero entry (variable-k models): the mask removes index 4 from S_1 and A.
    idx = torch.tensor([[0, 1], [1, 4]])
    support = torch.tensor([[True, True], [True, False]])
    assert torch.isclose(off_support_l1(Z, idx, support_BK=support), torch.tensor(0.1))  # (0 + 0.2) / 2
    # An active set from elsewhere (e.g. the union over ranks) is used as given.
    active = torch.tensor([True, True, True, True, False])
    assert torch.isclose(off_support_l1(Z, IDX, active_N=active), torch.tensor((1 + 0.5 + 0.2 + 2) / 2))


def test_ratio_of_an_all_zero_row_has_finite_gradient():
    z = torch.zeros(2, 5, requires_grad=True)
    l1_l2_ratio(z, IDX).backward()
    assert torch.isfinite(z.grad).all()


def test_fused_penalties_match_the_definitions_in_value_and_gradient():
    from visionsae.train.regularizers import active_set_penalties
    torch.manual_seed(0)
    z = torch.randn(7, 30, dtype=torch.double)
    z[2] = 0  # a row with an all-zero z_A
    idx = torch.stack([torch.randperm(30)[:4] for _ in range(7)])
    support = torch.rand(7, 4) > 0.3
    for sup in (None, support):
        za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        off, ratio = active_set_penalties(za, idx, support_BK=sup)
        (0.3 * off + 0.7 * ratio).backward()
        ref = 0.3 * off_support_l1(zb, idx, support_BK=sup) + 0.7 * l1_l2_ratio(zb, idx, support_BK=sup)
        ref.backward()
        assert torch.isclose(0.3 * off + 0.7 * ratio, ref)
        assert torch.allclose(za.grad, zb.grad)
    # Hand-computed case of the definitions, through the fused op.
    off, ratio = active_set_penalties(Z, IDX)
    assert torch.isclose(off, torch.tensor(0.6)) and torch.isclose(ratio, l1_l2_ratio(Z, IDX))


def test_reg_on_relu_measures_the_positive_part_and_leaves_negative_z_alone():
    from visionsae.train.regularizers import active_set_penalties
    # input 0: A minus S_0 = {2}, z = -1 -> 0;  input 1: {0}, z = 0.2;  mean 0.1
    assert torch.isclose(off_support_l1(Z, IDX, on="relu"), torch.tensor(0.1))
    r0 = (3 + 2) / (9 + 4) ** 0.5
    r1 = (0.2 + 5 + 4) / (0.04 + 25 + 16) ** 0.5
    assert torch.isclose(l1_l2_ratio(Z, IDX, on="relu"), torch.tensor((r0 + r1) / 2), atol=1e-6)
    for fn in (lambda z: sum(active_set_penalties(z, IDX, on="relu")),
               lambda z: off_support_l1(z, IDX, on="relu") + l1_l2_ratio(z, IDX, on="relu")):
        z = Z.clone().requires_grad_()
        fn(z).backward()
        assert torch.all(z.grad[Z < 0] == 0)  # no push on negative pre-activations
        assert torch.all(z.grad[:, :3][Z[:, :3] > 0] != 0)
    # raw (the default) pushes the negative off-support entry z_02 = -1 toward zero, i.e. up
    z = Z.clone().requires_grad_()
    off_support_l1(z, IDX).backward()
    assert z.grad[0, 2] < 0


def test_reg_on_expands_names_and_is_recorded():
    from visionsae.train.config import TrainConfig, expand_runs
    specs = expand_runs(TrainConfig(store="s", reg=("none", "both"), reg_on=("raw", "relu")))
    assert [s.name for s in specs] == ["topk-k32-none", "topk-k32-both-b1e-05-g0.001",
                                       "topk-k32-both-b1e-05-g0.001-onrelu"]
    assert [s.reg_on for s in specs] == ["raw", "raw", "relu"]


def test_evaluation_reports_the_trained_quantities():
    """sae-eval's trained_penalties equal the training penalties on the same batch, for both measures."""
    from visionsae.evaluate.metrics import TrainedPenalties
    torch.manual_seed(1)
    z = torch.randn(9, 40)
    idx = torch.stack([torch.randperm(40)[:5] for _ in range(9)])
    support = torch.rand(9, 5) > 0.2
    for on in ("raw", "relu"):
        for sup in (None, support):
            acc = TrainedPenalties(on)
            acc.update(z, idx, sup)
            got = acc.result()
            assert got["on"] == on
            assert abs(got["off_support_l1"] - float(off_support_l1(z, idx, support_BK=sup, on=on))) < 1e-5
            assert abs(got["l1_l2_ratio"] - float(l1_l2_ratio(z, idx, support_BK=sup, on=on))) < 1e-5


def test_reg_on_is_saved_in_the_checkpoint(tmp_path):
    import numpy as np

    from visionsae.sae import load_checkpoint
    from visionsae.store import write_array_store
    from visionsae.train import TrainConfig, train
    x = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    write_array_store(tmp_path / "s", {"emb": x}, images_per_shard=256)
    paths = train(TrainConfig(store=str(tmp_path / "s"), out=str(tmp_path / "r"), n_latents=16, k=(2,),
                              reg=("both",), reg_on=("raw", "relu"), batch_size=64, steps=3, progress=False))
    got = {load_checkpoint(p)[1]["train"]["name"]: load_checkpoint(p)[1]["train"]["reg_on"] for p in paths}
    assert got == {"topk-k2-both-b1e-05-g0.001": "raw", "topk-k2-both-b1e-05-g0.001-onrelu": "relu"}
