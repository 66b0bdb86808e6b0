"""sae-train's held-out metrics use sae-eval's definitions (issue 13, item 5: one nmse formula)."""

from __future__ import annotations

import pytest
import torch

from visionsae.evaluate.metrics import ReconAccumulator
from visionsae.sae import build_sae
from visionsae.sae.registry import resolve_config
from visionsae.train.validation import validation_metrics

torch.set_num_threads(1)


def test_validation_fvu_and_nmse_equal_the_evaluation_accumulator():
    torch.manual_seed(0)
    # rows of very different norms: the mean of per-row ratios and the ratio of sums then differ a lot
    x_BD = torch.randn(300, 10) * torch.logspace(-1, 1, 300)[:, None] + 0.5
    model = build_sae(resolve_config("topk", 10, 40, 3)).eval()
    got = validation_metrics(model, x_BD, batch_size=64, device=torch.device("cpu"))
    acc = ReconAccumulator(torch.zeros(10))
    with torch.no_grad():
        acc.update(x_BD, model(x_BD).x_hat_BD)
    ref = acc.result()
    assert got["nmse"] == pytest.approx(ref["nmse"], rel=1e-6)  # float32 forwards in batches of 64 vs 300
    assert got["fvu"] == pytest.approx(ref["fvu"], rel=1e-6)  # float32 forwards in batches of 64 vs 300
