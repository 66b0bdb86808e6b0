"""The training step never waits for the device: every variant, with and without AuxK and the regularizers.

On the CPU every call that would force a host synchronisation on a GPU (reading a value back, a Python
branch on a tensor, boolean-mask indexing, nonzero) is made to raise during the non-logging steps of a
short run, which must still finish. On CUDA the same run passes under torch.cuda's sync debug mode.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from visionsae.store import write_array_store
from visionsae.train import TrainConfig
from visionsae.train import trainer as trainer_mod
from visionsae.train.training_run import Run

READ_BACKS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy", "nonzero")
ARCHS = ("topk", "batchtopk", "relu", "softk")
LOG_EVERY = 5


def _raises(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"host synchronisation in a training step: {name}")
    return fail


def _has_bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def no_host_sync():
    """Every read-back and data-dependent shape raises inside the block."""
    mp = pytest.MonkeyPatch()
    get, put = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def getitem(self, idx):
        if _has_bool_index(idx):
            raise AssertionError("host synchronisation in a training step: boolean-mask indexing")
        return get(self, idx)

    def setitem(self, idx, value):
        if _has_bool_index(idx):
            raise AssertionError("host synchronisation in a training step: boolean-mask assignment")
        return put(self, idx, value)

    try:
        for name in READ_BACKS:
            mp.setattr(torch.Tensor, name, _raises(f"Tensor.{name}"))
        for name in ("nonzero", "masked_select", "unique"):
            mp.setattr(torch, name, _raises(f"torch.{name}"))
        mp.setattr(torch.Tensor, "__getitem__", getitem)
        mp.setattr(torch.Tensor, "__setitem__", setitem)
        yield
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
    return str(write_array_store(tmp_path_factory.mktemp("sync") / "s.zarr", {"e": x}, images_per_shard=100).path)


def _guarded_run(monkeypatch, cfg: TrainConfig, guard) -> list[int]:
    """Train with ``guard`` around every step that is neither the first nor a logging step."""
    guarded: list[int] = []
    step_fn = Run.train_step

    def train_step(self, x_BD, step, total, lr_factor):
        if step == 0 or (step + 1) % LOG_EVERY == 0 or step + 1 == total:
            return step_fn(self, x_BD, step, total, lr_factor)
        guarded.append(step)
        with guard():
            return step_fn(self, x_BD, step, total, lr_factor)

    monkeypatch.setattr(Run, "train_step", train_step)
    trainer_mod.train(cfg)
    return guarded


def _cfg(store, out, device, auxk_coeff):
    # dead_rows of two batches: latents die early, so AuxK is really computed in most steps
    return TrainConfig(store=store, arch=ARCHS, k=(3,), n_latents=48, reg=("none", "both"), batch_size=64,
                       steps=24, log_every=LOG_EVERY, device=device, out=str(out), dead_rows=128,
                       auxk_coeff=auxk_coeff, save_every=0, progress=False, val_fraction=0.1)


@pytest.mark.parametrize("auxk_coeff", [1 / 32, 0.0])
def test_no_step_reads_the_device_back(store, tmp_path, monkeypatch, auxk_coeff):
    torch.set_num_threads(1)
    auxk_ran = []
    import visionsae.train.training_run as training_run
    auxk = training_run.auxk_loss
    monkeypatch.setattr(training_run, "auxk_loss", lambda *a: auxk_ran.append(1) or auxk(*a))
    guarded = _guarded_run(monkeypatch, _cfg(store, tmp_path / "run", "cpu", auxk_coeff), no_host_sync)
    assert len(guarded) >= 15
    assert bool(auxk_ran) == (auxk_coeff > 0)


def test_the_guard_catches_a_read_back():
    with no_host_sync():
        t = torch.ones(3)
        for bad in (lambda: t.sum().item(), lambda: bool(t.sum()), lambda: t[t > 0], lambda: int(t.max()),
                    lambda: t.tolist(), lambda: torch.nonzero(t)):
            with pytest.raises(AssertionError, match="host synchronisation"):
                bad()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("auxk_coeff", [1 / 32, 0.0])
def test_no_step_synchronises_under_cuda_sync_debug_mode(store, tmp_path, monkeypatch, auxk_coeff):
    @contextlib.contextmanager
    def sync_error():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    guarded = _guarded_run(monkeypatch, _cfg(store, tmp_path / "run", "cuda", auxk_coeff), sync_error)
    assert len(guarded) >= 15


def test_batch_active_of_a_dense_code_counts_per_column():
    """Dense training codes (ReLU, BatchTopK) pass one index row expanded over the batch: the stride-0 shortcut
    gives the set the general path gives."""
    from visionsae.train.regularizers import batch_active
    a_BN = torch.relu(torch.randn(6, 9, generator=torch.Generator().manual_seed(0)))
    a_BN[:, 4] = 0
    idx_BN = torch.arange(9).expand(6, 9)
    dense = batch_active(idx_BN, 9, a_BN > 0)
    assert torch.equal(dense, batch_active(idx_BN.contiguous(), 9, a_BN > 0)) and not dense[4]
