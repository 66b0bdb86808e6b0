"""The default learning rate (issue 13, item 6): 3x the LLM-scale rule in short runs, that rule in long ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionsae.sae import load_checkpoint
from visionsae.store import write_array_store
from visionsae.train import TrainConfig, train
from visionsae.train.config import default_lr, llm_lr

torch.set_num_threads(1)


def test_default_lr_is_three_times_the_llm_rule_in_short_runs_and_the_rule_in_long_ones():
    assert llm_lr(2 ** 14) == pytest.approx(2e-4) and llm_lr(4 * 2 ** 14) == pytest.approx(1e-4)
    for n in (640, 1280, 5120):
        assert default_lr(n, 200) == pytest.approx(3 * llm_lr(n))
        assert default_lr(n, 1000) == pytest.approx(3 * llm_lr(n))
        assert default_lr(n, 2000) == pytest.approx(1.5 * llm_lr(n))
        assert default_lr(n, 3000) == pytest.approx(llm_lr(n)) == default_lr(n, 10 ** 6) == default_lr(n)
    lrs = [default_lr(1280, s) for s in (10, 100, 1000, 1500, 2500, 3000, 50_000)]
    assert lrs == sorted(lrs, reverse=True)


def test_sae_train_uses_and_records_the_default(tmp_path):
    x = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    write_array_store(tmp_path / "s", {"emb": x}, images_per_shard=128)
    (ck,) = train(TrainConfig(store=str(tmp_path / "s"), out=str(tmp_path / "r"), n_latents=32, k=(2,),
                              batch_size=64, steps=5, progress=False))
    assert load_checkpoint(ck)[1]["train"]["lr"] == pytest.approx(default_lr(32, 5)) == pytest.approx(3 * llm_lr(32))
