"""The store contract: round trips, a store written with plain zarr from cache_layout.md, and damage."""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest

from conftest import mounted_tmpfs
from visionsae.errors import StoreError
from visionsae.store import LayerSpec, StoreSpec, StoreWriter, open_store, write_array_store


def _acts(n_rows: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_rows, d)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 2e-3), ("bfloat16", 1.6e-2)])
def test_round_trip(tmp_path, fmt, dtype, tol):
    x = _acts(300 * 3, 8)
    labels = np.arange(300) % 4
    store = write_array_store(tmp_path / "s", {"blk": x}, labels, tokens_per_image=3, dtype=dtype, format=fmt,
                              images_per_shard=64)
    store.verify()
    assert store.n_shards == 5 and store.format == fmt
    y = store.read_rows("blk", 0, 900)
    assert np.abs(y - x).max() <= tol * np.abs(x).max()
    np.testing.assert_array_equal(store.labels, labels)
    # statistics are over the stored values, in float64
    info = store.layer()
    np.testing.assert_allclose(info.mean, y.astype(np.float64).mean(0), rtol=1e-10, atol=1e-12)
    assert info.mean_sq_norm == pytest.approx((y.astype(np.float64) ** 2).sum(1).mean(), rel=1e-12)
    # slots come back image by image, in the order asked
    got = store.read_slots("blk", np.array([299, 0, 65]))
    np.testing.assert_array_equal(got, y[[897, 898, 899, 0, 1, 2, 195, 196, 197]])


def test_zarr_and_hdf5_same_content_and_identity(tmp_path):
    x = _acts(200, 6)
    a = write_array_store(tmp_path / "a.zarr", {"e": x}, np.arange(200) % 2, format="zarr", images_per_shard=50)
    b = write_array_store(tmp_path / "b.h5", {"e": x}, np.arange(200) % 2, format="hdf5", images_per_shard=50)
    assert a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.read_rows("e", 0, 200), b.read_rows("e", 0, 200))
    assert isinstance(b.shard_array("e", 1), np.memmap)  # contiguous HDF5 is memory-mapped too


def test_store_written_with_plain_zarr_reads_back(tmp_path):
    """Follow cache_layout.md with zarr + numpy only (no visionsae writer) and read through the package."""
    import zarr

    path, n, ips, T, d = tmp_path / "plain.zarr", 10, 4, 2, 5
    x = _acts(n * T, d, seed=3).astype(np.float16)
    labels = np.arange(n) % 3
    root_attrs = {
        "format": "visionsae-activations", "format_version": 1,
        "backbone": {"id": "mine", "weights": "x", "fingerprint": None, "preprocessing": None},
        "dataset": {"id": "toy", "root": None, "split": "train", "n_images": n, "classes": ["a", "b", "c"]},
        "tokens": "all", "dtype": "float16", "images_per_shard": ips, "n_images": n, "n_shards": 3,
        "layers": ["L0"], "extract": {}, "complete": False, "n_skipped": 0}
    root = zarr.open_group(str(path), mode="w", attributes={"visionsae": root_attrs})
    cfg = {"compressors": None, "filters": None, "fill_value": 0, "config": {"write_empty_chunks": True}}
    root.create_array("images/index", shape=(n,), chunks=(ips,), dtype="int64", **cfg)[:] = np.arange(n)
    root.create_array("images/label", shape=(n,), chunks=(ips,), dtype="int64", **cfg)[:] = labels
    root.create_array("images/valid", shape=(n,), chunks=(ips,), dtype="uint8", **cfg)[:] = 1
    layer = root.create_group("layers/L0", attributes={"visionsae": {
        "name": "L0", "source": "mine.0", "kind": "residual", "d": d, "tokens_per_image": T,
        "token_kind": "all", "dtype": "float16", "count": n * T,
        "mean_sq_norm": float((x.astype(np.float64) ** 2).sum(1).mean())}})
    layer.create_array("acts", shape=(n * T, d), chunks=(ips * T, d), dtype="float16", **cfg)[:] = x
    layer.create_array("mean", shape=(d,), chunks=(d,), dtype="float64", **cfg)[:] = x.astype(np.float64).mean(0)
    for s in range(3):
        chunks = {}
        for key in (f"images/index/c/{s}", f"images/label/c/{s}", f"images/valid/c/{s}", f"layers/L0/acts/c/{s}/0"):
            blob = (path / key).read_bytes()
            chunks[key] = {"nbytes": len(blob), "crc32": zlib.crc32(blob)}
        rows = x[s * ips * T:(s + 1) * ips * T].astype(np.float64)
        stats = {"L0": {"count": len(rows), "sum": rows.sum(0).tolist(), "sum_sq_norm": float((rows ** 2).sum())}}
        root.create_group(f"manifest/shard-{s:06d}", attributes={"visionsae": {"shard": s, "chunks": chunks,
                                                                               "stats": stats}})
    root.attrs["visionsae"] = {**root_attrs, "complete": True}

    store = open_store(path)
    store.verify()
    np.testing.assert_array_equal(store.read_rows("L0", 0, n * T), x.astype(np.float32))
    np.testing.assert_array_equal(store.labels, labels)
    assert store.classes == ["a", "b", "c"] and store.layer("L0").tokens_per_image == T


def test_flipped_byte_is_caught_by_checksum(tmp_path):
    store = write_array_store(tmp_path / "s", {"e": _acts(128, 4)}, images_per_shard=32)
    chunk = tmp_path / "s" / "layers" / "e" / "acts" / "c" / "2" / "0"
    blob = bytearray(chunk.read_bytes())
    blob[17] ^= 0xFF
    chunk.write_bytes(bytes(blob))
    store = open_store(tmp_path / "s")
    store.verify_shard(1)
    with pytest.raises(StoreError, match=r"shard 2 .* fails its checksum \(layers/e/acts/c/2/0\)"):
        store.verify_shard(2)


def test_bad_paths_give_one_line_errors(tmp_path):
    with pytest.raises(StoreError, match="no activation store at"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "junk.bin").write_bytes(os.urandom(100))
    with pytest.raises(StoreError, match="neither a Zarr directory nor an HDF5 file"):
        open_store(tmp_path / "junk.bin")
    (tmp_path / "dir").mkdir()
    with pytest.raises(StoreError, match="not a visionsae activation store"):
        open_store(tmp_path / "dir")
    write_array_store(tmp_path / "s", {"e": _acts(10, 3)})
    (tmp_path / "s" / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(tmp_path / "s")


def _spec(n_images=100, ips=25, fmt="zarr", batch=8) -> StoreSpec:
    return StoreSpec(backbone={"id": "toy", "weights": "none", "fingerprint": "sha256:0", "preprocessing": None},
                     dataset={"id": "toy", "root": None, "split": "train", "n_images": n_images, "classes": []},
                     tokens="cls", dtype="float32", layers=(LayerSpec("e", "e", "embedding", 4, 1, "embedding"),),
                     images_per_shard=ips, extract={"batch_size": batch}, format=fmt)


def _write(writer: StoreWriter, shards, x):
    for s in shards:
        a, b = writer.shard_slots(s)
        writer.write_shard(s, index=np.arange(a, b), label=np.zeros(b - a), valid=np.ones(b - a, bool),
                           acts={"e": x[a:b]})


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_incomplete_store_refused_then_resumed(tmp_path, fmt):
    x = _acts(100, 4)
    w = StoreWriter.create(tmp_path / "s", _spec(fmt=fmt))
    _write(w, [0, 2], x)
    with pytest.raises(StoreError, match="missing 2 of 4 shards"):
        w.finalize()
    w.close()
    with pytest.raises(StoreError, match=r"incomplete \(2 of 4 shards written\).*--resume"):
        open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="already exists: pass --resume"):
        StoreWriter.create(tmp_path / "s", _spec(fmt=fmt))
    with pytest.raises(StoreError, match="its 'extract' differs"):
        StoreWriter.create(tmp_path / "s", _spec(fmt=fmt, batch=16), mode="resume")
    w = StoreWriter.create(tmp_path / "s", _spec(fmt=fmt), mode="resume")
    assert w.done_shards() == {0, 2}
    _write(w, [1, 3], x)
    w.finalize()
    w.close()
    np.testing.assert_array_equal(open_store(tmp_path / "s").read_rows("e", 0, 100), x)


def test_resume_gives_identical_bytes(tmp_path):
    x = _acts(100, 4)
    w = StoreWriter.create(tmp_path / "a", _spec())
    _write(w, range(4), x)
    w.finalize()
    w = StoreWriter.create(tmp_path / "b", _spec())
    _write(w, [3, 1], x)
    w = StoreWriter.create(tmp_path / "b", _spec(), mode="resume")
    _write(w, [0, 2], x)
    w.finalize()
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_overwrite_refuses_what_is_not_a_store(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError, match="not a visionsae activation store: refusing to overwrite"):
        StoreWriter.create(tmp_path / "precious", _spec(), mode="overwrite")
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "years of work"


def test_full_disk_leaves_no_shard_marked_complete(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "96k") as mnt:
        spec = StoreSpec(**{**_spec().__dict__, "layers": (LayerSpec("e", "e", "embedding", 64, 1, "embedding"),),
                            "dataset": {"id": "toy", "root": None, "split": "train", "n_images": 400, "classes": []}})
        x = _acts(400, 64)
        w = StoreWriter.create(mnt / "s", spec)  # holds the lock beside the store until closed
        written = []
        with pytest.raises(StoreError, match="disk is full.*--resume"):
            for s in range(w.n_shards):
                _write(w, [s], x)
                written.append(s)
        assert 0 < len(written) < w.n_shards
        assert w.done_shards() == set(written)  # the shard that failed has no record
        assert not [p for p in mnt.rglob("*.tmp-*")]  # no temporary files left behind
        meta = json.loads((mnt / "s" / "zarr.json").read_text())
        assert meta["attributes"]["visionsae"]["complete"] is False
        w.close()

def test_resume_removes_temporaries_of_a_killed_writer(tmp_path):
    x = _acts(100, 4)
    w = StoreWriter.create(tmp_path / "sub" / "s", _spec())  # the parent folder is created too
    _write(w, [0], x)
    litter = tmp_path / "sub" / "s" / "layers" / "e" / "acts" / "c" / "1" / "0.tmp-99999"
    litter.parent.mkdir(parents=True)
    litter.write_bytes(b"half a chunk")
    StoreWriter.create(tmp_path / "sub" / "s", _spec(), mode="join")
    assert litter.exists()  # joining ranks never touch files another rank may be writing
    w = StoreWriter.create(tmp_path / "sub" / "s", _spec(), mode="resume")
    assert not litter.exists() and w.done_shards() == {0}
