"""Promise: a process killed at any file operation resumes to exactly what an uninterrupted run writes.

Every writer routes its ordering operations (``os.replace``, ``os.fsync``, h5py writes and flushes)
through ``visionsae.faults``; ``VISIONSAE_CRASH_AT=N:before|after`` kills the process with SIGKILL
around the Nth one. The table below names each run and how many file operations it makes (a test
checks the count, so the table cannot go stale); every operation is a crash point, killed before and
after, in a forked child (cheap; training: in a real CLI process, as autograd does not survive a fork).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import store_files
from visionsae import faults
from visionsae.errors import StoreError
from visionsae.store import StoreWriter, open_store, write_array_store
from visionsae.store.arrays import layer_specs_from_arrays
from visionsae.store.layout import StoreSpec

# (run, file operations it makes, what a crash at any of them leads to)
CASES = [
    ("zarr store, 2 shards", 37, "refused as incomplete (or complete and whole); --resume gives identical bytes"),
    ("hdf5 store, 2 shards", 26, "refused as incomplete (or complete and whole); --resume gives identical bytes"),
    ("sae-train, 8 steps, saves at 4", 10, "--resume reaches bit-identical weights, optimiser state, metrics, log"),
    ("zarr classifier head replaced", 9, "the store reads a whole head, the old or the new, never none or a mix"),
]
WHEN = ("before", "after")
REPO = Path(__file__).resolve().parents[1]


def _points(run: str) -> list[tuple[int, str]]:
    n = dict((c[0], c[1]) for c in CASES)[run]
    return [(i, w) for i in range(1, n + 1) for w in WHEN]


# --- stores ---------------------------------------------------------------------------------------------------
X = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
LABELS = np.arange(6) % 2


def _spec(fmt: str) -> StoreSpec:
    return StoreSpec(backbone={"id": "arrays", "weights": "arrays", "fingerprint": None, "preprocessing": None},
                     dataset={"id": "arrays", "root": None, "split": "train", "n_images": 6, "classes": ["0", "1"]},
                     tokens="cls", dtype="float32", layers=layer_specs_from_arrays({"e": X}, 6, 1),
                     images_per_shard=4, format=fmt)


def _write(path: Path, fmt: str, mode: str) -> None:
    w = StoreWriter.create(path, _spec(fmt), mode=mode)
    try:
        for s in sorted(set(range(w.n_shards)) - w.done_shards()):
            a, b = w.shard_slots(s)
            w.write_shard(s, index=np.arange(a, b), label=LABELS[a:b], valid=np.ones(b - a, bool),
                          acts={"e": X[a:b]})
        w.finalize()
    finally:
        w.close()


def _store_path(tmp: Path, fmt: str) -> Path:
    return tmp / ("s.zarr" if fmt == "zarr" else "s.h5")


def _in_child(fn, env: dict[str, str], timeout: float = 120) -> int:
    """Run ``fn`` in a forked child with ``env`` set; its wait status (killed: -signal)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            torch.set_num_threads(1)  # the parent's thread pools do not survive a fork
            os.environ.update(env)
            faults.reset()
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the child writer did not finish in {timeout} s")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    out = {}
    for fmt in ("zarr", "hdf5"):
        _write(_store_path(root, fmt), fmt, "new")
        out[fmt] = store_files(_store_path(root, fmt))
    return out


@pytest.mark.parametrize("fmt,run", [("zarr", CASES[0][0]), ("hdf5", CASES[1][0])])
def test_the_table_counts_every_store_operation(tmp_path, fmt, run):
    log = tmp_path / "ops.txt"
    assert _in_child(lambda: _write(_store_path(tmp_path, fmt), fmt, "new"), {faults.LOG_ENV: str(log)}) == 0
    assert len(log.read_text().splitlines()) == dict((c[0], c[1]) for c in CASES)[run]


@pytest.mark.parametrize("fmt,n,when", [("zarr", n, w) for n, w in _points(CASES[0][0])]
                         + [("hdf5", n, w) for n, w in _points(CASES[1][0])])
def test_store_killed_at_a_file_operation_resumes_identically(tmp_path, straight, fmt, n, when):
    path = _store_path(tmp_path, fmt)
    status = _in_child(lambda: _write(path, fmt, "new"), {faults.CRASH_ENV: f"{n}:{when}"})
    assert status == -signal.SIGKILL
    try:
        store = open_store(path)
    except StoreError as err:  # absent or incomplete: refused with one line
        assert "\n" not in str(err)
    else:  # `complete` is only ever set on a store that opens and checks out
        store.verify()
        del store  # (an HDF5 file open for reading cannot be reopened for writing)
    _write(path, fmt, "resume")
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert not leftovers
    assert store_files(path) == straight[fmt]


# --- training -------------------------------------------------------------------------------------------------
TRAIN = ["--layer", "e", "--n-latents", "16", "--k", "2", "--batch-size", "16", "--steps", "8", "--save-every", "4",
         "--log-every", "2", "--lr", "1e-3", "--no-progress"]


@pytest.fixture(scope="module")
def train_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_store")
    x = np.random.default_rng(1).standard_normal((96, 8)).astype(np.float32)
    write_array_store(root / "s.zarr", {"e": x}, np.arange(96) % 3, images_per_shard=32)
    return root / "s.zarr"


def _train_cli(store: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "visionsae.train.cli", "--store", str(store), "--out", str(out),
                           *TRAIN, *extra], capture_output=True, text=True, env=full, timeout=300)


def _train_in_process(store: Path, out: Path, resume: bool) -> None:
    from visionsae.train import TrainConfig, train
    train(TrainConfig(store=str(store), layer="e", n_latents=16, k=(2,), batch_size=16, steps=8, save_every=4,
                      log_every=2, lr=1e-3, out=str(out), resume=resume, progress=False))


def _final(out: Path) -> dict:
    ckpt = torch.load(out / "topk-k2-none" / "ckpt.pt", weights_only=True)
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    log = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
           for line in (out / "topk-k2-none" / "log.jsonl").read_text().splitlines()]
    return {"weights": ckpt["state_dict"], "metrics": ckpt["metrics"], "step": ckpt["step"],
            "optim": state["runs"][next(iter(state["runs"]))]["optim"]["state"], "log": log}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_store):
    out = tmp_path_factory.mktemp("trained") / "r"
    _train_in_process(train_store, out, resume=False)
    return _final(out)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def test_the_table_counts_every_training_operation(tmp_path, train_store):
    log = tmp_path / "ops.txt"
    assert _train_cli(train_store, tmp_path / "r", env={faults.LOG_ENV: str(log)}).returncode == 0
    assert len(log.read_text().splitlines()) == CASES[2][1]


# "before N" and "after N-1" leave the same files (a killed process keeps the page cache): every distinct
# on-disk state is "after" some operation, plus "before" the first.
@pytest.mark.parametrize("n,when", [(1, "before")] + [(n, "after") for n in range(1, CASES[2][1] + 1)])
def test_training_killed_at_a_save_resumes_bit_identically(tmp_path, train_store, trained, n, when):
    out = tmp_path / "r"
    # A fresh process, not a fork: autograd refuses to run in a child forked after the parent used its
    # threads (which other tests in the same session may have done).
    assert _train_cli(train_store, out, env={faults.CRASH_ENV: f"{n}:{when}"}).returncode == -signal.SIGKILL
    _train_in_process(train_store, out, resume=True)
    assert _equal(_final(out), trained)
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name]  # the killed writer's temporaries are gone


def test_default_saves_a_few_times_and_a_finished_run_is_left_as_is(tmp_path, train_store, monkeypatch):
    """Without --save-every a run saves at each quarter (so any run can be resumed); --resume on a finished run
    rewrites nothing."""
    from visionsae.train import TrainConfig, train
    log = tmp_path / "ops.txt"
    monkeypatch.setenv(faults.LOG_ENV, str(log))
    faults.reset()
    cfg = dict(store=str(train_store), layer="e", n_latents=16, k=(2,), batch_size=16, steps=8, out=str(tmp_path / "r"),
               progress=False)
    train(TrainConfig(**cfg))
    saves = [line for line in log.read_text().splitlines() if line.endswith("replace " + str(tmp_path / "r" /
                                                                                            "trainer_state.pt"))]
    assert len(saves) == 4  # steps 2, 4, 6 and the end
    files = lambda: {str(p): p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    train(TrainConfig(**cfg, resume=True))
    assert files() == before


# --- the classifier head (an optional part, written after the store is complete) -----------------------------
def _head(seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal(2).astype(np.float32)


def _write_head(path: Path, seed: int) -> None:
    from visionsae.store.extras import head_attrs, write_head
    weight_CD, bias_C = _head(seed)
    write_head(path, weight_CD, bias_C, head_attrs(weight_CD, input_kind="e", source="test", classes=["0", "1"]))


@pytest.fixture()
def headed_store(tmp_path):
    path = _store_path(tmp_path, "zarr")
    _write(path, "zarr", "new")
    _write_head(path, seed=1)
    return path


def test_the_table_counts_every_head_operation(tmp_path, headed_store):
    log = tmp_path / "ops.txt"
    assert _in_child(lambda: _write_head(headed_store, seed=2), {faults.LOG_ENV: str(log)}) == 0
    assert len(log.read_text().splitlines()) == CASES[3][1]


@pytest.mark.parametrize("n,when", _points(CASES[3][0]))
def test_head_replacement_killed_leaves_a_whole_head(headed_store, n, when):
    from visionsae.store.extras import read_head
    status = _in_child(lambda: _write_head(headed_store, seed=2), {faults.CRASH_ENV: f"{n}:{when}"})
    assert status == -signal.SIGKILL
    head = read_head(headed_store)
    assert head is not None
    assert any(np.array_equal(head.weight_CD, w) and np.array_equal(head.bias_C, b) for w, b in (_head(1), _head(2)))
    _write_head(headed_store, seed=2)  # the next write (sae-extract --resume) finishes the job and tidies up
    head = read_head(headed_store)
    assert np.array_equal(head.weight_CD, _head(2)[0]) and np.array_equal(head.bias_C, _head(2)[1])
    assert sorted(p.name for p in headed_store.iterdir() if p.name.startswith("head")) == ["head"]
    open_store(headed_store).verify()
