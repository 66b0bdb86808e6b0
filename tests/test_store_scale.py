"""The reader at many shards (bounded open files, O(1) per shard) and its checks of the manifest and statistics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from visionsae.errors import StoreError
from visionsae.store import open_store, write_array_store
from visionsae.store import layout



def _store(path: Path, n_images: int = 64, ips: int = 16, d: int = 4, layers=("e",)):
    rng = np.random.default_rng(0)
    acts = {name: rng.standard_normal((n_images, d)).astype(np.float32) for name in layers}
    write_array_store(path, acts, np.arange(n_images) % 4, images_per_shard=ips)
    return path


def _edit_json(file: Path, edit) -> None:
    meta = json.loads(file.read_text())
    edit(meta["attributes"]["visionsae"])
    file.write_text(json.dumps(meta))


# (what is damaged, how, the one-line error expected); every case must be refused by the reader
def _drop_chunk_entry(p):
    _edit_json(p / "manifest" / "shard-000001" / "zarr.json", lambda r: r["chunks"].pop("layers/e/acts/c/1/0"))


def _edit_mean(p):
    f = p / "layers" / "e" / "mean" / "c" / "0"
    mean = np.frombuffer(f.read_bytes(), dtype="<f8").copy()
    mean[0] += 0.5
    f.write_bytes(mean.tobytes())


def _edit_attr(key, factor):
    def edit(p):
        _edit_json(p / "layers" / "e" / "zarr.json", lambda a: a.update({key: a[key] * factor}))
    return edit


def _drop_stats(p):
    _edit_json(p / "manifest" / "shard-000002" / "zarr.json", lambda r: r.pop("stats"))


CORRUPTIONS = [
    ("record without an acts entry", _drop_chunk_entry, r"shard-000001 .* does not list chunk layers/e/acts/c/1/0"),
    ("layer mean edited", _edit_mean, r"layer 'e' .* wrong mean array"),
    ("mean_sq_norm edited", _edit_attr("mean_sq_norm", 1.5), r"layer 'e' .* wrong mean_sq_norm"),
    ("count edited", _edit_attr("count", 2), r"layer 'e' .* wrong count 128"),
    ("record without statistics", _drop_stats, r"shard-000002 .* has no statistics for layer 'e'"),
    ("valid chunk deleted", lambda p: (p / "images" / "valid" / "c" / "0").unlink(),
     r"missing the chunk file images/valid/c/0"),
    ("label chunk deleted", lambda p: (p / "images" / "label" / "c" / "3").unlink(),
     r"missing the chunk file images/label/c/3"),
]


@pytest.mark.parametrize("what,damage,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_the_reader_refuses_a_damaged_manifest_or_statistics(tmp_path, what, damage, message):
    path = _store(tmp_path / "s.zarr")
    damage(path)
    with pytest.raises(StoreError, match=message) as err:
        store = open_store(path)
        store.layer("e")
        _ = store.valid, store.labels
        store.verify()
    assert "\n" not in str(err.value)


def test_a_deleted_acts_chunk_is_reported_missing_by_both_read_paths(tmp_path):
    path = _store(tmp_path / "s.zarr")
    (path / "layers" / "e" / "acts" / "c" / "2" / "0").unlink()
    store = open_store(path)
    with pytest.raises(StoreError, match=r"missing the chunk file layers/e/acts/c/2/0 of shard 2"):
        store.verify_shard(2)
    with pytest.raises(StoreError, match=r"missing the chunk file layers/e/acts/c/2/0 of shard 2"):
        store.read_shard_into("e", 2, np.empty((16, 4), np.float32))


def test_read_shard_into_reads_verifies_and_matches_the_memory_map(tmp_path):
    path = _store(tmp_path / "s.zarr", n_images=40)
    store = open_store(path)
    out = np.empty((16, 4), np.float32)
    for s in range(store.n_shards):
        n = store.read_shard_into("e", s, out)
        np.testing.assert_array_equal(out[:n], store.shard_array("e", s))
        assert (s, f"layers/e/acts/c/{s}/0") in store._verified
    blob = bytearray((path / "layers/e/acts/c/1/0").read_bytes())
    blob[3] ^= 0x10
    (path / "layers/e/acts/c/1/0").write_bytes(bytes(blob))
    with pytest.raises(StoreError, match=r"shard 1 .* fails its checksum \(layers/e/acts/c/1/0\)"):
        open_store(path).read_shard_into("e", 1, out)


def test_the_reader_keeps_few_files_open(tmp_path):
    from visionsae.store import reader
    store = open_store(_store(tmp_path / "s.zarr", n_images=2 * reader.MAX_OPEN_MAPS * 4, ips=4))
    for s in range(store.n_shards):
        store.shard_array("e", s)
    assert len(store._maps) == reader.MAX_OPEN_MAPS


def test_the_reader_keeps_few_bytes_mapped(tmp_path, monkeypatch):
    """Large shards: the maps held are bounded by bytes too (the pages read of a map count in resident memory)."""
    from visionsae.store import reader
    store = open_store(_store(tmp_path / "s.zarr", n_images=40, ips=4))
    shard_bytes = store.shard_array("e", 0).nbytes
    monkeypatch.setattr(reader, "MAX_MAPPED_BYTES", 3 * shard_bytes)
    for s in range(store.n_shards):
        store.shard_array("e", s)
        assert sum(a.nbytes for a in store._maps.values()) == store._mapped_bytes <= 3 * shard_bytes
    assert list(store._maps) == [("e", s) for s in (7, 8, 9)]  # the most recent ones


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, request):
    """2,000 shards of 2 images (d = 8). fsync is skipped: this store is about reading, and 10,000 fsyncs
    would take minutes."""
    mp = pytest.MonkeyPatch()
    mp.setattr(layout.os, "fsync", lambda fd: None)
    try:
        path = tmp_path_factory.mktemp("many") / "s.zarr"
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4000, 8)).astype(np.float32)
        write_array_store(path, {"e": x}, np.arange(4000) % 3, images_per_shard=2)
    finally:
        mp.undo()
    return path


def _limited(*args, module):
    """A CLI under `ulimit -n 256`: far fewer descriptors than the store has shards."""
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
            f"sys.argv = ['x'] + sys.argv[1:]; runpy.run_module('{module}', run_name='__main__')")
    import os
    import subprocess
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_train_and_eval_on_2000_shards_under_256_open_files(many_shards, tmp_path):
    out = tmp_path / "run"
    r = _limited("--store", str(many_shards), "--k", "4", "--n-latents", "32", "--batch-size", "256",
                 "--epochs", "1", "--device", "cpu", "--out", str(out), "--no-progress", "--preload", "no",
                 "--buffer-mb", "1", module="visionsae.train.cli")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = out / "topk-k4-none" / "ckpt.pt"  # <out>/<name>/, one configuration or many (run_layout.md)
    assert ckpt.exists()
    r = _limited(str(ckpt), "--out", str(tmp_path / "report"), "--quiet", "--k-sweep", "2",
                 "--probe-budgets", "", "--top-images", "4", module="visionsae.evaluate.cli")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report
