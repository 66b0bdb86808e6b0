"""Promise: a full disk stops a stage with one line, loses nothing already written, and --resume after
freeing space finishes the job as if nothing had happened.

Each case runs on a real, small tmpfs (needs root and mount; skipped elsewhere) that a "hog" file fills
at the moment the case names.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import mounted_tmpfs, store_files
from visionsae.errors import UserError
from visionsae.evaluate import EvalConfig, run
from visionsae.sae import load_checkpoint
from visionsae.store import StoreWriter, open_store, write_array_store
from visionsae.store import hdf5 as hdf5_backend
from visionsae.store.layout import LayerSpec, StoreSpec
from visionsae.train import TrainConfig, train

# (case, what must happen)
CASES = [
    ("hdf5 store larger than the disk", "refused before writing, with the size needed; no file left"),
    ("hdf5 store, disk fills mid-run", "one line; the file opens; --resume after freeing space: identical bytes"),
    ("hdf5 store, disk fills past the free-space check", "h5py's RuntimeError is one line, not a traceback"),
    ("zarr store, disk fills mid-run", "one line; --resume after freeing space: identical bytes"),
    ("sae-extract --format hdf5 on a disk too small", "exit 2 with one line; no file left"),
    ("sae-train, disk full from the start", "one line"),
    ("sae-train, disk fills before a save", "one line; the last checkpoint loads; --resume finishes bit-identically"),
    ("sae-eval, disk fills while writing the report", "one line; the previous report is unchanged"),
]
N, D, IPS = 64, 64, 8
X = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)


@pytest.fixture
def disk(tmp_path):
    with mounted_tmpfs(tmp_path / "mnt", "3m") as mnt:
        yield mnt


def _fill(disk: Path) -> Path:
    """Fill the disk to the last block with a hog file; remove the file to free the space."""
    hog = disk / "hog"
    fd = os.open(hog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for block in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while os.write(fd, b"\0" * block):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    return hog


def _spec(fmt: str, n: int = N) -> StoreSpec:
    return StoreSpec(backbone={"id": "arrays", "weights": "arrays", "fingerprint": None, "preprocessing": None},
                     dataset={"id": "arrays", "root": None, "split": "train", "n_images": n, "classes": []},
                     tokens="cls", dtype="float32", layers=(LayerSpec("e", "e", "embedding", D, 1, "embedding"),),
                     images_per_shard=IPS, format=fmt)


def _write(w: StoreWriter, shards) -> None:
    for s in shards:
        a, b = w.shard_slots(s)
        w.write_shard(s, index=np.arange(a, b), label=np.zeros(b - a), valid=np.ones(b - a, bool), acts={"e": X[a:b]})


def _one_line(err: BaseException, *words: str) -> None:
    assert "\n" not in str(err)
    for w in words:
        assert w in str(err), str(err)


def _store_fills_mid_run(disk: Path, tmp: Path, fmt: str, bypass_check: bool, monkeypatch) -> None:
    name = "s.h5" if fmt == "hdf5" else "s.zarr"
    straight = tmp / f"straight-{name}"
    w = StoreWriter.create(straight, _spec(fmt))
    _write(w, range(w.n_shards))
    w.finalize()
    w.close()
    w = StoreWriter.create(disk / name, _spec(fmt))
    _write(w, range(3))
    hog = _fill(disk)
    if bypass_check:
        monkeypatch.setattr(hdf5_backend, "free_bytes", lambda path: 1 << 40)
    with pytest.raises(UserError) as info:
        _write(w, range(3, w.n_shards))
        w.finalize()
    _one_line(info.value, "disk is full" if not bypass_check else "")
    if bypass_check:
        w.close()
        return  # HDF5 itself failed mid-metadata: the promise is the one line
    assert w.done_shards() >= {0, 1, 2}
    w.close()
    hog.unlink()
    w = StoreWriter.create(disk / name, _spec(fmt), mode="resume")
    _write(w, sorted(set(range(w.n_shards)) - w.done_shards()))
    w.finalize()
    w.close()
    open_store(disk / name).verify()
    assert store_files(disk / name) == {k.replace("straight-", ""): v for k, v in store_files(straight).items()}


def _tiny_store(tmp: Path) -> Path:
    write_array_store(tmp / "acts.zarr", {"e": X[:, :8]}, np.arange(N) % 4, images_per_shard=16)
    return tmp / "acts.zarr"


def _train(store: Path, out: Path, **kw):
    args = dict(store=str(store), n_latents=16, k=(2,), batch_size=16, steps=8, save_every=4, log_every=2, lr=1e-3,
                out=str(out), progress=False)
    return train(TrainConfig(**{**args, **kw}))


@pytest.mark.parametrize("case,promise", CASES, ids=[c[0] for c in CASES])
def test_full_disk(disk, tmp_path, monkeypatch, case, promise):
    if case == "hdf5 store larger than the disk":
        with pytest.raises(UserError) as info:
            StoreWriter.create(disk / "s.h5", _spec("hdf5", n=20000))  # 5 MiB of rows on a 3 MiB disk
        _one_line(info.value, "needs about", "free")
        assert [p.name for p in disk.iterdir() if not p.name.startswith(".")] == []
    elif case == "hdf5 store, disk fills mid-run":
        _store_fills_mid_run(disk, tmp_path, "hdf5", False, monkeypatch)
    elif case == "hdf5 store, disk fills past the free-space check":
        _store_fills_mid_run(disk, tmp_path, "hdf5", True, monkeypatch)
    elif case == "zarr store, disk fills mid-run":
        _store_fills_mid_run(disk, tmp_path, "zarr", False, monkeypatch)
    elif case == "sae-extract --format hdf5 on a disk too small":
        from visionsae.extract.cli import main
        big = ["--model", "timm:test_vit", "--random-init", "--limit", "200", "--tokens", "all", "--dtype", "float32",
               "--format", "hdf5", "--workers", "0", "--quiet", "--out", str(disk / "x.h5")]
        _fill(disk)
        result = CliRunner().invoke(main, big)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "free" in lines[0], result.stderr[-1500:]
        assert not [p for p in disk.iterdir() if p.name.startswith("x.h5")]
    elif case == "sae-train, disk full from the start":
        store = _tiny_store(tmp_path)
        _fill(disk)
        with pytest.raises(UserError) as info:
            _train(store, disk / "run")
        _one_line(info.value, "disk is full")
    elif case == "sae-train, disk fills before a save":
        store = _tiny_store(tmp_path)
        (straight,) = _train(store, tmp_path / "straight")
        _train(store, disk / "run", stop_at_step=4)
        hog = _fill(disk)
        with pytest.raises(UserError) as info:
            _train(store, disk / "run", resume=True)
        _one_line(info.value, "disk is full")
        model, meta = load_checkpoint(disk / "run" / "topk-k2-none" / "ckpt.pt")  # the last good checkpoint, intact
        assert meta["step"] == 4
        hog.unlink()
        (ckpt,) = _train(store, disk / "run", resume=True)
        a, b = torch.load(ckpt, weights_only=True), torch.load(straight, weights_only=True)
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    elif case == "sae-eval, disk fills while writing the report":
        store = _tiny_store(tmp_path)
        (ckpt,) = _train(store, tmp_path / "run", val_fraction=0.25)
        cfg = EvalConfig(checkpoints=[str(ckpt)], k_sweep=(), probe_budgets=(), out=str(disk / "report"),
                         progress=False)
        run(cfg)
        before = {p.name: p.read_bytes() for p in (disk / "report").iterdir() if p.is_file()}
        _fill(disk)
        with pytest.raises(UserError) as info:
            run(cfg)
        _one_line(info.value, "disk is full", "unchanged")
        after = {p.name: p.read_bytes() for p in (disk / "report").iterdir() if p.is_file()}
        assert after == before and not [p for p in (disk / "report").iterdir() if ".tmp" in p.name]
    else:  # pragma: no cover
        raise AssertionError(case)
