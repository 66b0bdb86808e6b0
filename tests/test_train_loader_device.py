"""The loader's two paths: the CPU gather and the CUDA path (pinned staging, device gather) give the same rows
in the same order, in every stored dtype; the CUDA path keeps the training step free of host syncs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionsae.store import open_store, write_array_store
from visionsae.train import gather
from visionsae.train import loader as loader_module
from visionsae.train.loader import Loader, make_split

torch.set_num_threads(1)
T, D = 2, 6


@pytest.fixture(scope="module", params=[("float32", "zarr"), ("float16", "zarr"), ("bfloat16", "zarr"),
                                        ("bfloat16", "hdf5")], ids=lambda p: "-".join(p))
def store(tmp_path_factory, request):
    dtype, fmt = request.param
    x = np.random.default_rng(0).standard_normal((45 * T, D)).astype(np.float32)
    path = tmp_path_factory.mktemp("dev") / ("s.zarr" if fmt == "zarr" else "s.h5")
    return write_array_store(path, {"blk": x}, tokens_per_image=T, images_per_shard=7, dtype=dtype, format=fmt)


def _batches(store, device, preload, n=12, start=0, **kw):
    train, _ = make_split(store, 0.1, seed=2)
    loader = Loader(store, "blk", train, batch_size=10, seed=5, device=torch.device(device), scale=1.5,
                    preload=preload, buffer_bytes=1, group_shards=2, **kw)
    it = loader.batches(start)
    out = [next(it).cpu() for _ in range(n)]
    loader.close()
    if kw.get("fused_gather") and not loader.fused_gather:  # it fell back: the fused kernel was not tested
        pytest.skip("the fused CPU gather could not be compiled here (needs a C++ compiler)")
    return torch.stack(out)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_cpu_batches_are_the_scaled_stored_rows_in_stream_order(store, fused):
    """Against a reference built from numpy alone: the stream order of RowOrder, the stored values; with the
    eager gather (blocks of rows) and the compiled one-pass kernel alike."""
    got = _batches(store, "cpu", preload=False, fused_gather=fused)
    train, _ = make_split(store, 0.1, seed=2)
    loader = Loader(store, "blk", train, batch_size=10, seed=5, device=torch.device("cpu"), scale=1.5,
                    preload=False, buffer_bytes=1, group_shards=2)
    rows = store.read_rows("blk", 0, store.n_images * T)  # float32 of the stored values
    order = []
    epoch = 0
    while len(order) < got.shape[0] * 10:
        for gi, shards in enumerate(loader.order.groups(epoch)):
            base = np.concatenate([s * store.images_per_shard * T + loader.order.local_rows(s) for s in shards])
            order += base[loader.order.perm(epoch, gi, base.size)].tolist()
        epoch += 1
    want = torch.from_numpy(rows[order[:got.shape[0] * 10]] * np.float32(1.5)).reshape(got.shape)
    assert torch.equal(got, want)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_preloaded_streamed_resumed_and_rank_sliced_agree_on_cpu(store, fused):
    streamed = _batches(store, "cpu", preload=False)
    assert torch.equal(streamed, _batches(store, "cpu", preload=True, fused_gather=fused))
    assert torch.equal(streamed[4:], _batches(store, "cpu", preload=False, n=8, start=4, fused_gather=fused))
    halves = [_batches(store, "cpu", preload=False, rank=r, world=2, fused_gather=fused) for r in (0, 1)]
    assert torch.equal(streamed, torch.cat(halves, dim=1))


def test_a_gather_that_cannot_be_compiled_falls_back_to_the_same_rows(store, monkeypatch, capsys):
    def no_compiler():
        raise RuntimeError("no C++ compiler found\nsecond line")

    want = _batches(store, "cpu", preload=False, fused_gather=False)
    monkeypatch.setattr(gather, "_fused_kernel", no_compiler)
    train, _ = make_split(store, 0.1, seed=2)
    loader = Loader(store, "blk", train, batch_size=10, seed=5, device=torch.device("cpu"), scale=1.5,
                    preload=False, buffer_bytes=1, group_shards=2, fused_gather=True)
    it = loader.batches(0)
    got = torch.stack([next(it).clone() for _ in range(12)])
    loader.close()
    assert torch.equal(got, want) and loader.fused_gather is False
    err = capsys.readouterr().err
    assert "fused CPU gather could not be compiled (RuntimeError: no C++ compiler found)" in err
    assert "second line" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("preload", [False, True])
def test_cuda_batches_equal_cpu_batches(store, preload):
    want = _batches(store, "cpu", preload=False)
    got = _batches(open_store(store.path), "cuda", preload=preload)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_group_buffers_on_huge_pages_hold_what_is_written(dtype):
    """A buffer above one huge page comes from its own aligned mapping; it behaves as any [rows, d] tensor."""
    rows, d = (3 << 20) // (6 * dtype.itemsize) + 1, 6
    buf = gather.random_access_empty(rows, d, dtype)
    assert buf.shape == (rows, d) and buf.dtype == dtype and buf.is_contiguous()
    assert buf.data_ptr() % gather.HUGE_PAGE == 0
    src = torch.randn(rows, d).to(dtype)
    buf.copy_(src)
    assert torch.equal(buf, src) and gather.random_access_empty(4, d, dtype).shape == (4, d)


def test_the_fused_gather_is_the_default_only_for_long_epochs(store, monkeypatch):
    train, _ = make_split(store, 0.1, seed=2)

    def fused_by_default():
        return Loader(store, "blk", train, batch_size=10, seed=5, device=torch.device("cpu"), scale=1.5,
                      preload=False, buffer_bytes=1).fused_gather

    assert not fused_by_default()  # a tiny epoch: compiling would cost more than it saves
    monkeypatch.setattr(loader_module, "FUSE_MIN_ROWS", train.size * T)
    assert fused_by_default()
