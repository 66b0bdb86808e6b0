"""Promise: every bad input is one line, ``error: <what is wrong and what to do>``, exit status 2.

The table holds the command lines a hostile new user tried that once gave a traceback, ran out of
memory or were silently accepted; each must now be refused with one line containing the words given
(or, where the input is fine after all, succeed). Sizes are checked before anything is allocated.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from visionsae.evaluate.cli import main as eval_main
from visionsae.extract.cli import main as extract_main
from visionsae.sae.checkpoint import atomic_torch_save, with_checksum
from visionsae.store import open_store, write_array_store
from visionsae.train import TrainConfig, train
from visionsae.train.cli import main as train_main

EXTRACT = ["--model", "timm:test_vit", "--random-init", "--limit", "8", "--workers", "0", "--quiet",
           "--images-per-shard", "4"]
TRAIN = ["--expansion", "2", "--k", "2", "--batch-size", "16", "--steps", "4", "--no-progress"]
EVAL = ["--k-sweep", "", "--probe-budgets", "", "--quiet"]

# (stage, arguments ({store}, {ckpt}, {file}, {ro}, {h5}, {link}, {tmp} are filled in), expected: words of the
# one-line error, or "ok")
CASES = [
    ("extract", ["--out", "{file}"], "not a visionsae activation store"),
    ("extract", ["--out", "{file}/x.zarr"], "cannot create the folder"),
    ("extract", ["--out", "{ro}/x.zarr"], "Read-only file system"),
    ("extract", ["--out", "{link}", "--overwrite"], "symbolic link"),
    ("extract", ["--out", "{h5}", "--resume"], "ok"),  # an HDF5 store, resumed without --format hdf5
    ("extract", ["--out", "{tmp}/big.zarr", "--images-per-shard", str(10 ** 9)], "needs about .* of memory"),
    ("extract", ["--out", "{tmp}/x.zarr", "--nope"], "No such option.*--nope.*see sae-(extract|train|eval) --help"),
    ("extract", ["--out", "{tmp}/x.zarr", "--batch-size", "many"], "Invalid value for '--batch-size'"),
    ("train", ["--out", "{file}"], "is a file"),
    ("train", ["--out", "{file}/run"], "cannot write to"),
    ("train", ["--out", "{ro}/run"], "Read-only file system"),
    ("train", ["--out", "{tmp}/r", "--expansion", "inf"], "--expansion must be a finite"),
    ("train", ["--out", "{tmp}/r", "--lr", "inf"], "--lr must be a finite"),
    ("train", ["--out", "{tmp}/r", "--lr", "1e30"], "diverged"),
    ("train", ["--out", "{tmp}/r", "--warmup-steps", "-5"], "--warmup-steps must be non-negative"),
    ("train", ["--out", "{tmp}/r", "--dead-rows", "-1"], "--dead-rows must be at least 1"),
    ("train", ["--out", "{tmp}/r", "--stop-at-step", "-5"], "--stop-at-step must be non-negative"),
    ("train", ["--out", "{tmp}/r", "--reg", "none,,off"], "empty item"),
    ("train", ["--out", "{tmp}/r", "--k", "2,2"], "--k lists 2 more than once"),
    ("train", ["--out", "{tmp}/r", "--steps", str(10 ** 30)], "beyond what the row counters hold"),
    ("train", ["--out", "{tmp}/r", "--batch-size", str(10 ** 8)], "need about"),
    ("train", ["--out", "{tmp}/r", "--expansion", "1.25e8"], "need about"),  # 10^9 latents
    ("train", ["--out", "{tmp}/r", "--nope"], "No such option.*--nope.*see sae-(extract|train|eval) --help"),
    ("eval", ["--out", "{store}"], "is an activation store"),
    ("eval", ["--out", "{store}/report"], "inside an activation store"),
    ("eval", ["--out", "{file}"], "is a file"),
    ("eval", ["--out", "{file}/report"], "cannot create the report directory"),
    ("eval", ["--out", "{ro}/report"], "Read-only file system"),
    ("eval", ["--out", "{tmp}/rep", "--top-images", str(10 ** 9)], "need about"),
    ("eval", ["--out", "{tmp}/rep", "{nan_ckpt}"], "non-finite weights"),
    ("eval", ["--out", "{tmp}/rep", "--nope"], "No such option.*--nope.*see sae-(extract|train|eval) --help"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("places")
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    write_array_store(root / "s.zarr", {"e": x}, np.arange(64) % 4, images_per_shard=16)
    (root / "link.zarr").symlink_to(root / "s.zarr")
    (root / "file").write_text("not a store")
    (ckpt,) = train(TrainConfig(store=str(root / "s.zarr"), n_latents=16, k=(2,), batch_size=16, steps=4,
                                out=str(root / "run"), progress=False))
    raw = torch.load(ckpt, weights_only=True)
    raw.pop("checksum")
    raw["state_dict"]["W_dec"][0, 0] = float("nan")
    atomic_torch_save(with_checksum(raw), root / "nan" / "ckpt.pt")
    CliRunner().invoke(extract_main, EXTRACT + ["--format", "hdf5", "--out", str(root / "s.h5")])
    ro = root / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                             capture_output=True).returncode == 0
    yield {"root": root, "ckpt": ckpt, "ro": mounted}
    if mounted:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def _fill(args, places, tmp: Path) -> list[str]:
    root = places["root"]
    names = {"store": root / "s.zarr", "file": root / "file", "ro": root / "ro", "link": root / "link.zarr",
             "h5": tmp / "s.h5", "tmp": tmp, "nan_ckpt": root / "nan" / "ckpt.pt"}
    return [a.format(**{k: str(v) for k, v in names.items()}) for a in args]


@pytest.mark.parametrize("stage,args,expected", CASES, ids=[f"{c[0]} {' '.join(c[1])[:60]}" for c in CASES])
def test_bad_input_is_one_line(places, tmp_path, stage, args, expected):
    if any("{ro}" in a for a in args) and not places["ro"]:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    if "{h5}" in args:
        (tmp_path / "s.h5").write_bytes((places["root"] / "s.h5").read_bytes())
    argv = _fill(args, places, tmp_path)
    if stage == "extract":
        result = CliRunner().invoke(extract_main, EXTRACT + argv)
    elif stage == "train":
        result = CliRunner().invoke(train_main, ["--store", str(places["root"] / "s.zarr")] + TRAIN + argv)
    else:
        ckpts = [a for a in argv if a.endswith("ckpt.pt")] or [str(places["ckpt"])]
        result = CliRunner().invoke(eval_main, ckpts + EVAL + [a for a in argv if not a.endswith("ckpt.pt")])
    if expected == "ok":
        assert result.exit_code == 0, result.stderr
        assert open_store(tmp_path / "s.h5").format == "hdf5"
        return
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert re.search(expected, lines[0]), lines[0]
    if expected == "diverged" and (tmp_path / "r" / "topk-k2-none" / "ckpt.pt").exists():  # the last good checkpoint is kept
        from visionsae.sae import load_checkpoint
        assert load_checkpoint(tmp_path / "r" / "topk-k2-none" / "ckpt.pt")[1]["step"] < 4
