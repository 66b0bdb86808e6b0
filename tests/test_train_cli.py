"""sae-train refuses bad input with one line and writes nothing over an existing run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from visionsae.evaluate import EvalConfig, evaluate
from visionsae.store import write_array_store
from visionsae.train.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((512, 8)).astype(np.float32)
    path = tmp_path_factory.mktemp("cli") / "s.zarr"
    write_array_store(path, {"a": x, "b": x[:, :6].copy()}, images_per_shard=128)
    return path


def _run(*args):
    result = CliRunner().invoke(main, [*map(str, args), "--no-progress"])
    return result.exit_code, result.stdout, result.stderr


def _refused(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_trains_and_prints_the_checkpoint(store, tmp_path):
    code, out, err = _run("--store", store, "--layer", "b", "--n-latents", 16, "--k", 2, "--batch-size", 64,
                          "--steps", 5, "--out", tmp_path / "r")
    assert code == 0, err
    # one configuration or several: <out>/<name>/ckpt.pt (run_layout.md)
    assert out.strip().splitlines() == [str(tmp_path / "r" / "topk-k2-none" / "ckpt.pt")]
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["store"]["layer"] == "b" and cfg["store"]["d"] == 6


def test_final_record_without_a_validation_split(store, tmp_path):
    """The "final" log record marks a finished run (scripts wait for it), validation split or not."""
    code, _, err = _run("--store", store, "--layer", "b", "--n-latents", 16, "--k", 2, "--batch-size", 64,
                        "--steps", 3, "--val-fraction", 0, "--out", tmp_path / "r")
    assert code == 0, err
    last = json.loads((tmp_path / "r" / "topk-k2-none" / "log.jsonl").read_text().strip().splitlines()[-1])
    assert last["event"] == "final" and last["step"] == 3 and not any(k.startswith("val_") for k in last)


def test_missing_store(tmp_path):
    _refused(*_run("--store", tmp_path / "nope.zarr", "--out", tmp_path / "r")[::2], "no activation store")
    assert not (tmp_path / "r").exists()


def test_incomplete_store(tmp_path):
    path = tmp_path / "inc.zarr"
    write_array_store(path, {"a": np.ones((64, 4), np.float32)}, images_per_shard=32)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["visionsae"]["complete"] = False
    (path / "zarr.json").write_text(json.dumps(meta))
    _refused(*_run("--store", path, "--out", tmp_path / "r")[::2], "incomplete")
    assert not (tmp_path / "r").exists()


def test_corrupt_shard_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "bad.zarr"
    write_array_store(path, {"a": np.random.default_rng(1).standard_normal((256, 4)).astype(np.float32)},
                      images_per_shard=64)
    chunk = path / "layers" / "a" / "acts" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))
    _refused(*_run("--store", path, "--n-latents", 16, "--k", 2, "--batch-size", 32, "--steps", 3,
                   "--out", tmp_path / "r")[::2], "checksum", "shard 3")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,needle", [
    (["--layer", "a", "--n-latents", 16, "--k", 16], "must be below the number of latents"),
    (["--layer", "a", "--n-latents", 16, "--k", "4,20"], "must be below the number of latents"),
    (["--layer", "a", "--reg", "off", "--beta=-0.1"], "--beta must be"),
    (["--layer", "a", "--gamma=-1"], "--gamma must be"),
    (["--layer", "zz"], "unknown layer 'zz'"),
    ([], "several layers"),
    (["--layer", "a", "--arch", "topk,nope"], "unknown --arch"),
    (["--layer", "a", "--reg", "l2"], "unknown --reg"),
    (["--layer", "a", "--val-fraction", 1.5], "--val-fraction"),
])
def test_bad_settings_are_one_line_errors(store, tmp_path, args, needle):
    _refused(*_run("--store", store, "--out", tmp_path / "r", *args)[::2], needle)
    assert not (tmp_path / "r").exists()


def test_existing_run_is_not_overwritten(store, tmp_path):
    run = ["--store", store, "--layer", "a", "--n-latents", 16, "--k", 2, "--batch-size", 64, "--out", tmp_path / "r"]
    assert _run(*run, "--steps", 4)[0] == 0
    before = (tmp_path / "r" / "topk-k2-none" / "ckpt.pt").read_bytes()
    _refused(*_run(*run, "--steps", 8)[::2], "already holds a run", "--resume", "--overwrite")
    assert (tmp_path / "r" / "topk-k2-none" / "ckpt.pt").read_bytes() == before
    _refused(*_run(*run, "--steps", 8, "--resume")[::2], "--steps was 4")  # resuming needs the same settings
    assert _run(*run, "--steps", 8, "--overwrite")[0] == 0
    assert torch.load(tmp_path / "r" / "topk-k2-none" / "ckpt.pt", weights_only=True)["step"] == 8
    # --resume with nothing saved starts the run, as sae-extract --resume does (no advice that loops)
    assert _run(*run[:-1], tmp_path / "empty", "--steps", 8, "--resume")[0] == 0
    assert torch.load(tmp_path / "empty" / "topk-k2-none" / "ckpt.pt", weights_only=True)["step"] == 8


def test_checkpoint_evaluates_on_a_sibling_store(tmp_path):
    """Train on a 'train' store, evaluate on the 'test' store of the same backbone and layer: the checkpoint
    records the layer fingerprint that makes the two stores siblings."""
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((3, 8)).astype(np.float32) * 4

    def split(name, n):
        y = rng.integers(0, 3, n)
        x = centers[y] + rng.standard_normal((n, 8)).astype(np.float32)
        return write_array_store(tmp_path / name, {"a": x}, y, images_per_shard=64, split=name,
                                 backbone_fingerprint="sha256:toy")
    train, test = split("train", 384), split("test", 96)
    code, out, err = _run("--store", train.path, "--n-latents", 16, "--k", 2, "--batch-size", 64, "--steps", 20,
                          "--out", tmp_path / "r")
    assert code == 0, err
    record = json.loads((tmp_path / "r" / "config.json").read_text())["store"]
    assert record["layer_fingerprint"] == test.layer_fingerprint("a") is not None
    res = evaluate(EvalConfig([str(tmp_path / "r")], store=str(test.path), k_sweep=(), probe_budgets=(2,),
                              progress=False))
    summary = res.checkpoints[0].summary
    assert summary["reconstruction"]["n_rows"] == 96
    assert summary["probes"]["n_test"] == 96 and summary["probes"]["n_train"] > 0
