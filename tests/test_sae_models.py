"""The SAE variants behind the base interface: decoding, gradients, scale folding, k override, loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visionsae.sae import architectures, build_sae, load_checkpoint, save_checkpoint
from visionsae.sae.dictionary import encode_affine, gather_decode, geometric_median
from visionsae.sae.registry import resolve_config

BUILTIN = ("batchtopk", "relu", "softk", "topk")

torch.set_num_threads(1)  # tiny tensors: threads only add contention with other test processes

D, N, K = 12, 48, 4


def _model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    m = build_sae(resolve_config(arch, D, N, K, kest_hidden=16)).double()
    with torch.no_grad():  # move away from the tied init so that every parameter matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        m.after_step()
    return m


def test_all_variants_registered():
    # other test modules may register test-only variants; the built-in ones must all be there
    assert set(BUILTIN) <= set(architectures())


@pytest.mark.parametrize("k", [K, N // 4], ids=["gathered", "dense"])  # K < N/10 gathers rows, N/4 is one matmul
def test_gather_decode_matches_dense_and_passes_gradcheck(k):
    torch.manual_seed(1)
    W_ND = torch.randn(N, D, dtype=torch.double, requires_grad=True)
    acts_BK = torch.rand(5, k, dtype=torch.double, requires_grad=True)
    idx_BK = torch.stack([torch.randperm(N)[:k] for _ in range(5)])
    dense_BN = torch.zeros(5, N, dtype=torch.double).scatter(1, idx_BK, acts_BK)
    assert torch.allclose(gather_decode(acts_BK, idx_BK, W_ND), dense_BN @ W_ND)
    assert torch.autograd.gradcheck(lambda a, w: gather_decode(a, idx_BK, w), (acts_BK, W_ND))


def test_gather_decode_paths_agree_in_float32():
    """The dense path (K >= N/10, e.g. AuxK's k_aux = d/2) gives embedding_bag's values and gradients."""
    torch.manual_seed(3)
    n, d, k = 640, 96, 160
    W_ND = torch.randn(n, d, requires_grad=True)
    acts_BK = torch.rand(64, k, requires_grad=True)
    idx_BK = torch.stack([torch.randperm(n)[:k] for _ in range(64)])
    g_BD = torch.randn(64, d)
    results = []
    for decode in (gather_decode, lambda a, i, w: F.embedding_bag(i, w, per_sample_weights=a, mode="sum")):
        y_BD = decode(acts_BK, idx_BK, W_ND)
        grad_a, grad_W = torch.autograd.grad(y_BD, (acts_BK, W_ND), g_BD)
        results.append((y_BD, grad_a, grad_W))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_encoder_backward_matches_autograd():
    torch.manual_seed(2)
    args = [torch.randn(6, D, dtype=torch.double, requires_grad=True),
            torch.randn(N, D, dtype=torch.double, requires_grad=True),
            torch.randn(D, dtype=torch.double, requires_grad=True),
            torch.randn(N, dtype=torch.double, requires_grad=True)]
    assert torch.autograd.gradcheck(encode_affine, args)
    x, W, bp, b = args
    assert torch.allclose(encode_affine(x, W, bp, b), (x - bp) @ W.t() + b)


@pytest.mark.parametrize("arch", ["topk", "softk", "batchtopk", "relu"])
def test_fold_input_scale_maps_raw_inputs(arch):
    """folded(x) == unfolded(x * s) / s, in inference mode and (softk: soft phase) in training mode."""
    torch.manual_seed(3)
    x_BD = torch.randn(16, D, dtype=torch.double) * 3 + 1
    s = 0.37
    model = _model(arch)
    if arch == "batchtopk":  # give it a threshold fitted on other (scaled) rows: none of x's values sits on it
        model.calibrate((torch.randn(64, D, dtype=torch.double) * 3 + 1) * s)
    if arch == "softk":
        with torch.no_grad():
            model.alpha.fill_(0.3)  # a temperature at which the soft mask is far from hard
    folded = _model(arch)
    folded.load_state_dict(model.state_dict())
    folded.fold_input_scale(s)
    model.eval(), folded.eval()
    ref, got = model(x_BD * s), folded(x_BD)
    assert torch.allclose(got.x_hat_BD, ref.x_hat_BD / s, atol=1e-10)
    assert torch.allclose(got.acts_BK, ref.acts_BK / s, atol=1e-10)
    assert torch.equal(got.idx_BK, ref.idx_BK)
    if arch == "softk":
        model.train(), folded.train()
        model.begin_step(0, 100), folded.begin_step(0, 100)
        ref, got = model(x_BD * s), folded(x_BD)
        assert torch.allclose(got.x_hat_BD, ref.x_hat_BD / s, atol=1e-9)
        assert torch.allclose(got.k_B, ref.k_B, atol=1e-9)


@pytest.mark.parametrize("arch", ["topk", "softk", "batchtopk", "relu"])
def test_k_override_keeps_k_largest(arch):
    model = _model(arch).eval()
    x_BD = torch.randn(8, D, dtype=torch.double)
    out = model(x_BD, k=7)
    assert out.acts_BK.shape == (8, 7) and out.k_B is None
    z_BN = model.encode_pre(x_BD)
    top = z_BN.topk(7, dim=1).values
    assert torch.allclose(out.acts_BK.sort(1, descending=True).values, top.relu())
    assert torch.allclose(out.x_hat_BD, model.decode(out.acts_BK, out.idx_BK))


def test_topk_selects_then_relus_and_decodes_by_gather():
    model = _model("topk")
    x_BD = torch.randn(10, D, dtype=torch.double)
    out = model(x_BD)
    z_BN = model.encode_pre(x_BD)
    dense_BN = torch.zeros_like(z_BN).scatter(1, out.idx_BK, out.acts_BK)
    assert torch.equal(out.idx_BK.sort(1).values, z_BN.topk(K, dim=1).indices.sort(1).values)
    assert (out.acts_BK >= 0).all()
    assert torch.allclose(out.x_hat_BD, dense_BN @ model.W_dec + model.b_dec)


def test_decoder_projection_and_renormalisation():
    model = _model("topk")
    model.W_dec.grad = torch.randn_like(model.W_dec)
    model.prepare_grads()
    assert torch.allclose((model.W_dec.grad * model.W_dec).sum(1), torch.zeros(N, dtype=torch.double), atol=1e-12)
    with torch.no_grad():
        model.W_dec.mul_(3)
    model.after_step()
    assert torch.allclose(model.W_dec.norm(dim=1), torch.ones(N, dtype=torch.double))


def test_batchtopk_keeps_k_times_batch_in_training():
    model = _model("batchtopk").train()
    out = model(torch.randn(32, D, dtype=torch.double))
    assert int((out.acts_BK > 0).sum()) == K * 32
    assert (out.acts_BK > 0).sum(1).float().std() > 0  # a varying number per input
    assert model.threshold < 0  # the training step leaves the threshold alone: calibrate fits it


def test_softk_hard_mode_keeps_floor_k_per_input():
    model = _model("softk").eval()
    out = model(torch.randn(20, D, dtype=torch.double))
    kept_B = (out.acts_BK > 0).sum(1)
    assert torch.all(kept_B <= out.k_B.floor().long())
    assert out.k_B.min() >= 1 and out.k_B.max() <= N


def test_geometric_median_resists_outliers():
    x_BD = torch.zeros(101, 3)
    x_BD[:50, 0], x_BD[50:100, 0], x_BD[100] = -1.0, 1.0, torch.tensor([1e6, 0.0, 0.0])
    assert geometric_median(x_BD).norm() < 1.0 < x_BD.mean(0).norm()


def test_checkpoint_loads_with_weights_only(tmp_path):
    for arch in BUILTIN:
        model = _model(arch).float()
        path = tmp_path / f"{arch}.pt"
        save_checkpoint(path, model, input_scale=2.0, store={"path": "s", "fingerprint": "f", "layer": "l", "d": D},
                        split={"val_slots": torch.arange(3), "val_fraction": 0.1, "seed": 0}, train={"arch": arch},
                        step=5, metrics={"val_fvu": 0.5})
        torch.load(path, weights_only=True)  # raises on anything but tensors and plain types
        loaded, meta = load_checkpoint(path)
        x_BD = torch.randn(4, D)
        model.eval()
        assert torch.allclose(loaded(x_BD).x_hat_BD, model(x_BD).x_hat_BD)
        assert meta["split"]["val_slots"].tolist() == [0, 1, 2] and meta["store"]["d"] == D


def test_fused_topk_encoder_gradients_with_and_without_z():
    from visionsae.sae.dictionary import encode_topk
    torch.manual_seed(4)
    x = torch.randn(6, D, dtype=torch.double, requires_grad=True)
    W = torch.randn(N, D, dtype=torch.double, requires_grad=True)
    bp = torch.randn(D, dtype=torch.double, requires_grad=True)
    b = torch.randn(N, dtype=torch.double, requires_grad=True)
    # Only the kept values used: the sparse backward.
    assert torch.autograd.gradcheck(lambda *a: encode_topk(*a, K)[0].pow(2).sum(), (x, W, bp, b))
    # z used as well (a regularizer): the dense backward, with the kept values' gradient added in.
    assert torch.autograd.gradcheck(lambda *a: (lambda v, i, z: v.sum() + z.abs().sum())(*encode_topk(*a, K)),
                                    (x, W, bp, b))
    vals, idx, z = encode_topk(x, W, bp, b, K)
    assert torch.allclose(z, (x - bp) @ W.t() + b) and torch.equal(vals, z.gather(1, idx))


@pytest.mark.parametrize("arch", ["softk", "relu"])
def test_every_setting_is_saved_and_none_is_defaulted_at_load(arch, tmp_path):
    """Defaults are resolved once (resolve_config) and saved; a config without one is an error, not a default."""
    from visionsae.errors import CheckpointError
    from visionsae.sae import SAEConfig
    cfg = resolve_config(arch, D, N, K, variance_fraction=0.5)
    expected = {"softk": {"alpha", "k_weight", "k_max", "k_start", "anneal_frac", "min_anneal_steps", "hard_frac",
                          "kest_hidden"}, "relu": {"l1_coeff", "l1_warmup_frac"}}[arch]
    assert set(cfg.extra) == expected
    if arch == "softk":
        assert cfg.extra["k_weight"] == 2.0 and cfg.extra["k_max"] == 2 * K  # 1 / variance fraction; 2k
    model = build_sae(cfg)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, input_scale=1.0, store={"path": "s", "fingerprint": "f", "layer": "l", "d": D},
                    split={"val_slots": torch.arange(2), "val_fraction": 0.1, "seed": 0}, train={}, step=1, metrics={})
    assert torch.load(path, weights_only=True)["config"]["extra"] == cfg.extra
    for key in expected:
        partial = {k: v for k, v in cfg.extra.items() if k != key}
        with pytest.raises(KeyError, match=key):
            build_sae(SAEConfig(arch, D, N, K, extra=partial))
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["extra"].pop(sorted(expected)[0])
    del ckpt["checksum"]  # an older checkpoint: written before settings (and checksums) were saved
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="older visionsae"):
        load_checkpoint(tmp_path / "old.pt")


def test_firing_counts_of_a_dense_code_equal_the_general_path():
    """BatchTopK / ReLU train with K = n and one shared index row (stride 0): the column-sum shortcut must
    count exactly what the per-entry path counts."""
    from visionsae.sae.base import firing_counts, latent_counts
    acts_BN = torch.randn(7, 11).relu()
    idx_shared_BN = torch.arange(11).expand(7, 11)
    assert idx_shared_BN.stride(0) == 0
    idx_copy_BN = idx_shared_BN.contiguous()
    assert torch.equal(firing_counts(acts_BN, idx_shared_BN, 11), firing_counts(acts_BN, idx_copy_BN, 11))
    assert torch.equal(latent_counts(idx_shared_BN, 11), latent_counts(idx_copy_BN, 11))
    assert torch.equal(latent_counts(idx_shared_BN, 11), torch.full((11,), 7))


def test_a_device_that_is_not_one_is_a_one_line_error():
    from visionsae.device import resolve_device
    from visionsae.errors import UserError
    for name in ("gpu", "cpu:0x", "tpu"):
        with pytest.raises(UserError, match="--device"):
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda:7")
    else:
        with pytest.raises(UserError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
