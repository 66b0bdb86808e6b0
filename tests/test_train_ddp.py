"""Two processes under torchrun (gloo) train the same models as one process on the same batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from visionsae.store import write_array_store

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")
def test_two_process_run_equals_one_process(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3000, 16)) * rng.uniform(0.2, 3, 16)).astype(np.float32)
    store = tmp_path / "s.zarr"
    write_array_store(store, {"emb": x}, images_per_shard=512)
    # softk at a soft temperature: at the default alpha = 1e-4 the mask's slope is 1e4, which turns the
    # ~1e-7 rounding difference of a two-rank gradient sum into ~1e-3 differences within a few steps.
    args = ["--store", str(store), "--arch", "topk,batchtopk,softk", "--reg", "both", "--n-latents", "64",
            "--k", "4", "--batch-size", "64", "--steps", "25", "--dead-rows", "300", "--lr", "1e-3",
            "--save-every", "10", "--no-progress", "--softk-alpha", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    one = subprocess.run([sys.executable, "-m", "visionsae.train.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "visionsae.train.cli", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    printed = [line for line in two.stdout.splitlines() if line.endswith("ckpt.pt")]
    assert len(printed) == 3  # rank 0 alone reports the checkpoints
    for name in ("topk-k4-both-b1e-05-g0.001", "batchtopk-k4-both-b1e-05-g0.001", "softk-k4-both-b1e-05-g0.001"):
        a = torch.load(tmp_path / "one" / name / "ckpt.pt", weights_only=True)
        b = torch.load(tmp_path / "two" / name / "ckpt.pt", weights_only=True)
        assert b["train"]["world_size"] == 2 and a["step"] == b["step"] == 25
        for key, t in a["state_dict"].items():
            assert torch.allclose(t, b["state_dict"][key], rtol=1e-4, atol=1e-5), (name, key)
