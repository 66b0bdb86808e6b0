"""The exports other libraries load: sparsify's layout bit for bit, SAELens' cfg keys (cfg.json, the
fields SAE.load_from_disk(fold_W_dec_norm=True) needs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from visionsae.errors import UserError
from visionsae.sae.checkpoint import load_checkpoint, read_checkpoint
from visionsae.store import write_array_store
from visionsae.train import TrainConfig, export_saelens, export_sparsify, train

D, N, K = 12, 48, 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    x = np.random.default_rng(0).standard_normal((512, D)).astype(np.float32) * 2 + 0.5
    write_array_store(root / "s.zarr", {"emb": x}, images_per_shard=256, backbone_id="timm:toy_vit")
    paths = train(TrainConfig(store=str(root / "s.zarr"), out=str(root / "r"), arch=("topk", "batchtopk", "relu"),
                              k=(K,), n_latents=N, batch_size=128, steps=12, lr=3e-3, progress=False,
                              export_sparsify=True))
    return {load_checkpoint(p)[0].cfg.arch: p for p in paths}


def test_sparsify_layout_and_tensors_round_trip_bit_for_bit(runs):
    ckpt = runs["topk"]
    out = ckpt.parent / "sparsify"  # written by --export-sparsify
    assert sorted(f.name for f in out.iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((out / "cfg.json").read_text())
    assert {k: cfg[k] for k in ("d_in", "num_latents", "k", "activation", "normalize_decoder", "transcode",
                                "skip_connection", "multi_topk")} == \
        {"d_in": D, "num_latents": N, "k": K, "activation": "topk", "normalize_decoder": True, "transcode": False,
         "skip_connection": False, "multi_topk": False}
    state = read_checkpoint(ckpt)["state_dict"]
    want = {"encoder.weight": state["W_enc"], "encoder.bias": state["b_enc"], "W_dec": state["W_dec"],
            "b_dec": state["b_dec"]}
    with safe_open(str(out / "sae.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(want)
    got = load_file(str(out / "sae.safetensors"))
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype == torch.float32
        assert got[name].numpy().tobytes() == tensor.numpy().tobytes(), name


def test_sparsify_encoding_written_out_gives_the_same_codes(runs):
    """sparsify's encoder, topk(relu(encoder(x - b_dec))), on the exported tensors = this model's code."""
    model, _ = load_checkpoint(runs["topk"])
    w = load_file(str(runs["topk"].parent / "sparsify" / "sae.safetensors"))
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1)) * 2
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(K, dim=1, sorted=False)
    theirs = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    acts_BK, idx_BK = model.encode(x)
    assert torch.equal(model.dense_code(acts_BK, idx_BK), theirs)
    x_hat = theirs @ w["W_dec"] + w["b_dec"]
    assert torch.allclose(x_hat, model(x).x_hat_BD, atol=1e-5)


@pytest.mark.parametrize("arch", ["batchtopk", "relu"])
def test_variants_without_a_sparsify_counterpart_are_refused_in_one_line(runs, arch, tmp_path):
    assert not (runs[arch].parent / "sparsify").exists()
    with pytest.raises(UserError, match=f"'{arch}' SAE has no sparsify counterpart") as err:
        export_sparsify(runs[arch], tmp_path / "x")
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()


def test_saelens_cfg_names_the_backbone_and_allows_folding_the_decoder_norm(runs, tmp_path):
    model, meta = load_checkpoint(runs["topk"])
    cfg = json.loads((export_saelens(runs["topk"], tmp_path / "sl") / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "timm:toy_vit"
    assert cfg["metadata"]["store_fingerprint"] == meta["store"]["fingerprint"]
    # rescale_acts_by_decoder_norm multiplies each latent by its decoder row's norm: exact only if that is 1.
    assert cfg["rescale_acts_by_decoder_norm"] is True
    torch.testing.assert_close(model.W_dec.detach().norm(dim=1), torch.ones(N), rtol=0, atol=1e-6)
