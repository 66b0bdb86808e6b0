"""BatchTopK's inference threshold is the final model's (issue 13, item 1): held-out L0 = k after training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionsae.evaluate import EvalConfig, evaluate
from visionsae.sae import SAEConfig, build_sae
from visionsae.store import write_array_store
from visionsae.train import TrainConfig, train

torch.set_num_threads(1)

D, ATOMS = 24, 96


def _mixtures(n: int, seed: int = 0) -> np.ndarray:
    """Rows built from 4 to 40 of 96 unit atoms with positive weights, plus an offset (float32)."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((ATOMS, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    w = rng.uniform(0.2, 2.0, (n, ATOMS)) * (rng.random((n, ATOMS)) < rng.uniform(0.04, 0.4, (n, 1)))
    return (w @ atoms * 2 + 1).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("btk") / "s.zarr"
    write_array_store(path, {"emb": _mixtures(6000)}, images_per_shard=1024)
    return path


def test_inference_l0_on_held_out_rows_is_k(store, tmp_path):
    """A short run (the batch cut falls fast early on): sae-eval's held-out L0 within 10% of k, for k = 8, 16, 32."""
    paths = train(TrainConfig(store=str(store), out=str(tmp_path / "run"), arch=("batchtopk",), k=(8, 16, 32),
                              n_latents=192, batch_size=256, steps=120, lr=3e-3, val_fraction=0.2,
                              progress=False, log_every=1000))
    res = evaluate(EvalConfig([str(p) for p in paths], k_sweep=(), probe_budgets=(), out=str(tmp_path / "rep"),
                              progress=False))
    for ck in res.checkpoints:
        k = int(ck.name.split("-k")[1].split("-")[0])
        l0 = ck.summary["sparsity"]["l0"]
        assert abs(l0 - k) <= 0.1 * k, (ck.name, l0)


def test_calibrate_fires_k_per_row_on_its_rows():
    torch.manual_seed(0)
    model = build_sae(SAEConfig(arch="batchtopk", d_in=D, n_latents=64, k=5))
    x_MD = torch.from_numpy(_mixtures(3000, seed=1))
    model.calibrate(x_MD)
    model.eval()
    with torch.no_grad():
        out = model(x_MD)
    assert int((out.acts_BK > 0).sum()) == 5 * 3000
    a_flat = model.encode_pre(x_MD).detach().relu().flatten()
    assert float(model.threshold) == pytest.approx(float(a_flat.topk(5 * 3000).values.min()))
