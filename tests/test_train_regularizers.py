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
