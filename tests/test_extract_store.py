"""Whole runs: a killed-and-resumed run and a two-process torchrun write the same bytes as one plain run;
Zarr and HDF5 hold the same content; unreadable images; a full disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_image_tree, mounted_tmpfs, run_cli, store_files
from visionsae.errors import StoreError
from visionsae.extract import ExtractConfig, extract
from visionsae.extract.cli import main
from visionsae.store import open_store

# 60 images, 15 shards of 4, batches of 3 (so a shard ends with a short batch), two layers, all tokens
RUN = dict(model="timm:test_vit", random_init=True, dataset="folder", layers="2,-1", tokens="all",
           dtype="float16", images_per_shard=4, batch_size=3, workers=0)


def _cli_args(cfg: dict, root: Path, out: Path) -> list[str]:
    return ["--model", cfg["model"], "--random-init", "--dataset", "folder", "--data-root", str(root),
            "--layers", cfg["layers"], "--tokens", cfg["tokens"], "--dtype", cfg["dtype"],
            "--images-per-shard", str(cfg["images_per_shard"]), "--batch-size", str(cfg["batch_size"]),
            "--workers", "0", "--quiet", "--out", str(out)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("tree"), per_class=20, seed=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tree) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    result = extract(ExtractConfig(data_root=str(tree), out=str(out), progress=False, **RUN))
    assert (result.n_images, result.n_shards, result.shards_written) == (60, 15, 15)
    return out


def _records(store: Path) -> int:
    return len(list((store / "manifest").glob("shard-*/zarr.json")))


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(tmp_path, tree, reference):
    out = tmp_path / "killed.zarr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "visionsae.extract.cli", *_cli_args(RUN, tree, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and _records(out) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-300:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _records(out)
    assert 3 <= done < 15, f"{done} shards were complete at the kill"
    with pytest.raises(StoreError, match="incomplete|complete"):
        open_store(out)
    # without --resume the half-written store is refused
    refused = run_cli(*_cli_args(RUN, tree, out))
    assert refused.returncode == 2 and refused.stderr.strip().startswith("error:")
    assert "--resume" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    resumed = run_cli(*_cli_args(RUN, tree, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{60 - done * 4} extracted now" in resumed.stdout  # only the missing shards were computed
    assert store_files(out) == store_files(reference)


def test_resume_with_other_settings_is_refused(tmp_path, tree, reference):
    out = tmp_path / "copy.zarr"
    shutil.copytree(reference, out)
    other = dict(RUN, batch_size=4)
    with pytest.raises(StoreError, match="cannot resume .* 'extract' differs"):
        extract(ExtractConfig(data_root=str(tree), out=str(out), mode="resume", progress=False, **other))
    # resuming a complete store computes nothing and changes nothing
    result = extract(ExtractConfig(data_root=str(tree), out=str(out), mode="resume", progress=False, **RUN))
    assert result.shards_written == 0 and store_files(out) == store_files(reference)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, tree, reference):
    out = tmp_path / "ddp.zarr"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "visionsae.extract.cli",
                           *_cli_args(RUN, tree, out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout and proc.stdout.count("wrote") == 1  # rank 0 reports
    assert store_files(out) == store_files(reference)


def test_zarr_and_hdf5_hold_the_same(tmp_path, image_tree):
    stores = {}
    for fmt in ("zarr", "hdf5"):
        out = tmp_path / f"s.{fmt}"
        extract(ExtractConfig(model="timm:test_vit", random_init=True, model_kwargs={"img_size": 32},
                              dataset="folder", data_root=str(image_tree), layers="0,embedding", tokens="patches",
                              dtype="bfloat16", images_per_shard=10, workers=0, format=fmt, out=str(out),
                              progress=False))
        stores[fmt] = open_store(out)
    z, h = stores["zarr"], stores["hdf5"]
    h.verify()
    assert (z.format, h.format) == ("zarr", "hdf5") and z.fingerprint == h.fingerprint
    assert {k: v for k, v in z.attrs.items()} == {k: v for k, v in h.attrs.items()}
    for name in ("image_index", "labels", "valid"):
        np.testing.assert_array_equal(getattr(z, name), getattr(h, name))
    for layer in ("block_0", "embedding"):
        rows = z.layer(layer).tokens_per_image * z.n_images
        np.testing.assert_array_equal(z.read_rows(layer, 0, rows), h.read_rows(layer, 0, rows))
        np.testing.assert_array_equal(z.layer(layer).mean, h.layer(layer).mean)


def _damaged_tree(tmp_path: Path, image_tree: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "damaged"
    shutil.copytree(image_tree, root)
    bad = sorted(p for p in root.rglob("*.png"))[:2]
    bad[0].write_bytes(b"this is not a png")
    data = bad[1].read_bytes()
    bad[1].write_bytes(data[: len(data) // 3])  # truncated mid-stream
    return root, [p.relative_to(root).as_posix() for p in bad]


def test_unreadable_images_are_skipped_and_counted(tmp_path, image_tree):
    root, bad = _damaged_tree(tmp_path, image_tree)
    out = tmp_path / "skip.zarr"
    result = extract(ExtractConfig(model="timm:test_vit", random_init=True, model_kwargs={"img_size": 32},
                                   dataset="folder", data_root=str(root), images_per_shard=7, workers=0,
                                   out=str(out), progress=False))
    store = open_store(out)
    store.verify()
    assert result.n_skipped == 2 and store.attrs["n_skipped"] == 2
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    skipped = {files[i] for i in store.image_index[~store.valid]}
    assert skipped == set(bad)
    rows = store.read_rows("block_5", 0, store.n_images)
    assert not rows[~store.valid].any() and rows[store.valid].any()
    assert store.layer().count == store.n_images - 2  # statistics cover readable images only


def test_strict_fails_on_an_unreadable_image(tmp_path, image_tree):
    root, bad = _damaged_tree(tmp_path, image_tree)
    result = CliRunner().invoke(main, ["--model", "timm:test_vit", "--random-init", "--dataset", "folder",
                                       "--data-root", str(root), "--strict", "--workers", "0", "--quiet",
                                       "--out", str(tmp_path / "strict.zarr")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read image") and "--strict" in lines[0]
    assert bad[0] in lines[0] or bad[1] in lines[0]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk (needs root and mount; skipped elsewhere)."""
    with mounted_tmpfs(tmp_path / "mnt", "1m") as mnt:
        yield mnt


def test_full_disk_leaves_no_false_complete_shard(tmp_path, tiny_disk, image_tree):
    """float32 rows of 5 patch tokens x 64 at 8 images per shard: ~10 KiB a shard, 1 MiB fills mid-run."""
    big_tree = make_image_tree(tmp_path / "many", per_class=60, seed=2)  # 180 images, ~1.4 MiB of rows
    cfg = dict(model="timm:test_vit", random_init=True, model_kwargs={"img_size": 32}, dataset="folder",
               data_root=str(big_tree), layers="0,1,2,3,4,5", tokens="all", dtype="float32", images_per_shard=8,
               workers=0, progress=False)
    out = tiny_disk / "full.zarr"
    with pytest.raises(StoreError, match="disk is full"):
        extract(ExtractConfig(out=str(out), **cfg))
    done = _records(out)
    assert 0 < done < 23
    # every shard that has a record is intact; then finish it elsewhere and compare
    moved = tmp_path / "moved.zarr"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("*.tmp-*"))
    extract(ExtractConfig(out=str(moved), mode="resume", **cfg))
    straight = tmp_path / "straight.zarr"
    extract(ExtractConfig(out=str(straight), **cfg))
    assert store_files(moved) == store_files(straight)
