"""CUDA paths: bf16 autocast in the fused encoder and the loop, pinned prefetch, preload on the device."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from visionsae.sae import build_sae, load_checkpoint
from visionsae.sae.registry import resolve_config
from visionsae.store import write_array_store
from visionsae.train import TrainConfig, train
from visionsae.train.config import RunSpec
from visionsae.train.training_run import Run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]


@pytest.mark.parametrize("arch,reg", [("topk", "none"), ("topk", "both"), ("batchtopk", "none"), ("softk", "none"),
                                      ("relu", "none")])
def test_bf16_autocast_step_tracks_float32(arch, reg):
    torch.manual_seed(0)
    # softk: 0.05 in training units (alpha is stated at E||x||^2 = 1: times sqrt(128) here)
    base = build_sae(resolve_config(arch, 128, 1024, 16, alpha=0.05 / 128 ** 0.5)).cuda()
    x_BD = torch.randn(512, 128, device="cuda")
    base.init_from_sample(x_BD)
    runs = []
    for dtype in (None, torch.bfloat16):
        run = Run(RunSpec(arch, 16, reg, 1e-5, 1e-3), copy.deepcopy(base), lr=1e-3, variance=128.0,
                  dead_rows=256, auxk_coeff=1 / 32, grad_clip=1.0, world=1, autocast_dtype=dtype)
        for step in range(3):
            run.train_step(x_BD, step, 100, 1.0)
        runs.append(run)
    m32, m16 = runs[0].read_meter(), runs[1].read_meter()
    assert abs(m16["rec"] - m32["rec"]) < 0.05 * m32["rec"]
    for (name, p32), p16 in zip(runs[0].model.named_parameters(), runs[1].model.parameters()):
        assert p16.dtype == torch.float32 and torch.isfinite(p16).all(), name
        assert (p16 - p32).norm() < 0.05 * p32.norm() + 1e-3, name


@pytest.mark.parametrize("preload", ["yes", "no"])
def test_cuda_run_writes_a_cpu_loadable_checkpoint(tmp_path, preload):
    x = np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32)
    store = tmp_path / "s.zarr"
    write_array_store(store, {"a": x}, images_per_shard=512, dtype="bfloat16")
    (ckpt,) = train(TrainConfig(store=str(store), out=str(tmp_path / "r"), device="cuda", n_latents=512, k=(8,),
                                batch_size=256, steps=40, preload=preload, progress=False))
    model, meta = load_checkpoint(ckpt)
    assert next(model.parameters()).device.type == "cpu"
    assert np.isfinite(meta["metrics"]["val_fvu"]) and meta["metrics"]["val_fvu"] < 1.0
