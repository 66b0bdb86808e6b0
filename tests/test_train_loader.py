"""The training loader: image-level split, epoch coverage, determinism, resume, rank slices, checksums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionsae.errors import StoreError
from visionsae.store import open_store, write_array_store
from visionsae.train.loader import Loader, make_split

torch.set_num_threads(1)

T, D, N_IMAGES, IPS = 3, 4, 50, 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Row r of the store carries r in column 0, so batches can be traced back to rows."""
    rows = N_IMAGES * T
    acts = np.random.default_rng(0).standard_normal((rows, D)).astype(np.float32)
    acts[:, 0] = np.arange(rows)
    valid = np.ones(N_IMAGES, dtype=bool)
    valid[[3, 17, 40]] = False
    acts[np.repeat(~valid, T)] = 0
    path = tmp_path_factory.mktemp("loader") / "s.zarr"
    return write_array_store(path, {"blk": acts}, tokens_per_image=T, images_per_shard=IPS, valid=valid)


def _loader(store, train, **kw):
    args = dict(batch_size=16, seed=3, device=torch.device("cpu"), scale=1.0, preload=False, buffer_bytes=1)
    args.update(kw)
    return Loader(store, "blk", train, **args)


def _ids(batches, n):
    return [b[:, 0].long().tolist() for _, b in zip(range(n), batches)]


def test_split_is_deterministic_and_image_level(store):
    train, val = make_split(store, 0.2, seed=1)
    assert np.array_equal(val, make_split(store, 0.2, seed=1)[1])
    assert not np.array_equal(val, make_split(store, 0.2, seed=2)[1])
    assert len(val) == round(0.2 * 47) and not set(val) & set(train)
    assert set(val) | set(train) == set(np.flatnonzero(store.valid))


def test_one_epoch_visits_every_training_row_once_and_no_validation_row(store):
    train, val = make_split(store, 0.2, seed=1)
    loader = _loader(store, train, group_shards=2)
    n = loader.n_rows
    assert n == train.size * T
    ids = sum(_ids(loader.batches(0), -(-n // 16)), [])[:n]
    assert sorted(ids) == sorted((train[:, None] * T + np.arange(T)).reshape(-1).tolist())
    # Shuffled across shards within a group, and a new order next epoch.
    nxt = sum(_ids(loader.batches(0), -(-2 * n // 16)), [])[n:2 * n]
    assert ids != sorted(ids) and nxt != ids and sorted(nxt) == sorted(ids)


def test_resume_position_and_rank_slices_reproduce_the_stream(store):
    train, _ = make_split(store, 0.2, seed=1)
    full = _ids(_loader(store, train, group_shards=2).batches(0), 12)
    assert _ids(_loader(store, train, group_shards=2).batches(7), 5) == full[7:12]
    r0 = _ids(_loader(store, train, group_shards=2, rank=0, world=2).batches(0), 12)
    r1 = _ids(_loader(store, train, group_shards=2, rank=1, world=2).batches(0), 12)
    assert [a + b for a, b in zip(r0, r1)] == full


def test_preloaded_and_streamed_orders_agree(store):
    train, _ = make_split(store, 0.0, seed=1)
    streamed = _ids(_loader(store, train, group_shards=3).batches(0), 20)
    preloaded = _ids(_loader(store, train, group_shards=3, preload=True).batches(0), 20)
    assert streamed == preloaded
    sample = _loader(store, train, group_shards=3).sample(40)[:, 0].long().tolist()
    assert sample == sum(streamed, [])[:40]


def test_scale_and_half_precision(tmp_path):
    acts = np.random.default_rng(1).standard_normal((64, D)).astype(np.float32)
    st = write_array_store(tmp_path / "h.zarr", {"blk": acts}, images_per_shard=16, dtype="float16")
    loader = Loader(st, "blk", np.arange(64), batch_size=64, seed=0, device=torch.device("cpu"), scale=2.0,
                    preload=True, buffer_bytes=1)
    x = next(loader.batches(0))
    assert x.dtype == torch.float32
    want = np.sort(acts.astype(np.float16).astype(np.float32)[:, 0] * 2)
    assert np.array_equal(np.sort(x[:, 0].numpy()), want)


def test_a_flipped_byte_is_caught_by_the_shard_checksum(tmp_path):
    acts = np.random.default_rng(2).standard_normal((64, D)).astype(np.float32)
    path = tmp_path / "c.zarr"
    write_array_store(path, {"blk": acts}, images_per_shard=16)
    chunk = path / "layers" / "blk" / "acts" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    loader = Loader(open_store(path), "blk", np.arange(64), batch_size=8, seed=0, device=torch.device("cpu"),
                    scale=1.0, preload=False, buffer_bytes=1)
    with pytest.raises(StoreError, match="shard 2 .*checksum"):
        for _ in zip(range(20), loader.batches(0)):
            pass
