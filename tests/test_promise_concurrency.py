"""Promise: one writer per output. A second sae-extract, sae-train or sae-eval on an output another process
is writing is refused with one line naming that process; a lock left by a killed process is taken over.

Races use real processes started together (the sae-train CLI; forked extractions); the refusals are checked against a lock held by a
forked child, whose pid the message must name.
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

from visionsae.errors import UserError
from visionsae.evaluate import EvalConfig, run
from visionsae.extract import ExtractConfig, extract
from visionsae.locks import OutputLock, lock_path
from visionsae.store import StoreSpec, StoreWriter, open_store, write_array_store
from visionsae.store.layout import LayerSpec
from visionsae.train import TrainConfig, train

# (case, what must happen)
CASES = [
    ("sae-extract on a store another process writes", "one line naming its pid and host"),
    ("sae-train on a run directory another process writes", "one line naming its pid and host"),
    ("sae-eval on a report directory another process writes", "one line naming its pid and host"),
    ("two sae-train CLIs (--k 2 and --k 4) started together on one --out",
     "exactly one trains; the other exits 2 with one line; the directory holds one model and its log alone"),
    ("two sae-extract processes started together on one --out",
     "exactly one writes a whole store; the other is refused with one line"),
    ("sae-train killed with SIGKILL, then --resume", "the stale lock is taken over; the run continues"),
]
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("conc")
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    write_array_store(root / "s.zarr", {"e": x}, np.arange(64) % 4, images_per_shard=16)
    return root / "s.zarr"


def _holder(target: Path, what: str):
    """A forked child that holds the lock of ``target`` until killed; returns its pid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        lock = OutputLock(target, what).acquire()  # noqa: F841 - held while the child sleeps
        os.write(w, b"1")
        time.sleep(120)
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    return pid


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _refused_naming(fn, pid: int) -> None:
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and f"pid {pid}" in msg and "being written by another" in msg, msg


def _race(fns, tmp: Path) -> list[tuple[int, str]]:
    """Start each of ``fns`` in its own forked process at once; (exit status, error message) of each:
    0 when it returned, 2 with the message when it raised a UserError."""
    go_r, go_w = os.pipe()
    pids = []
    for i, fn in enumerate(fns):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(go_w)
            torch.set_num_threads(1)
            os.read(go_r, 1)  # every racer waits for the start signal
            code, msg = 0, ""
            try:
                fn()
            except UserError as err:
                code, msg = 2, str(err)
            except BaseException as err:  # a bug: shows in the assertion
                code, msg = 1, repr(err)
            (tmp / f"racer-{i}.txt").write_text(msg)
            os._exit(code)
        pids.append(pid)
    os.close(go_r)
    os.write(go_w, b"x" * len(fns))
    os.close(go_w)
    out = []
    for i, pid in enumerate(pids):
        _, status = os.waitpid(pid, 0)
        out.append((os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1, (tmp / f"racer-{i}.txt").read_text()))
    return out


def _cli(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("case,promise", CASES, ids=[c[0] for c in CASES])
def test_one_writer_per_output(store, tmp_path, case, promise):
    if case == "sae-extract on a store another process writes":
        spec = StoreSpec(backbone={"id": "x", "weights": "x", "fingerprint": None, "preprocessing": None},
                         dataset={"id": "x", "root": None, "split": "train", "n_images": 8, "classes": []},
                         tokens="cls", dtype="float32", layers=(LayerSpec("e", "e", "embedding", 4, 1, "embedding"),),
                         images_per_shard=4)
        pid = _holder(tmp_path / "x.zarr", "sae-extract")
        try:
            for mode in ("new", "resume", "overwrite"):
                _refused_naming(lambda: StoreWriter.create(tmp_path / "x.zarr", spec, mode=mode), pid)
        finally:
            _stop(pid)
        StoreWriter.create(tmp_path / "x.zarr", spec).close()  # a dead holder's lock is taken over
    elif case == "sae-train on a run directory another process writes":
        pid = _holder(tmp_path / "run", "sae-train")
        try:
            _refused_naming(lambda: train(TrainConfig(store=str(store), n_latents=16, k=(2,), batch_size=16,
                                                      steps=2, out=str(tmp_path / "run"), progress=False)), pid)
        finally:
            _stop(pid)
        assert not (tmp_path / "run").exists()
    elif case == "sae-eval on a report directory another process writes":
        (ckpt,) = train(TrainConfig(store=str(store), n_latents=16, k=(2,), batch_size=16, steps=2,
                                    val_fraction=0.25, out=str(tmp_path / "run"), progress=False))
        pid = _holder(tmp_path / "report", "sae-eval")
        try:
            _refused_naming(lambda: run(EvalConfig(checkpoints=[str(ckpt)], k_sweep=(), probe_budgets=(),
                                                   out=str(tmp_path / "report"), progress=False)), pid)
        finally:
            _stop(pid)
    elif case.startswith("two sae-train"):
        common = ["--store", store, "--n-latents", 16, "--batch-size", 16, "--steps", 300, "--log-every", 10,
                  "--no-progress", "--out", tmp_path / "run"]
        procs = [_cli("visionsae.train.cli", *common, "--k", k) for k in (2, 4)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        err = next(e for code, e in results if code == 2).strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert "being written by another sae-train" in err[0] or "already holds a run" in err[0]
        winner_k = 2 if results[0][0] == 0 else 4
        winner = tmp_path / "run" / f"topk-k{winner_k}-none"
        assert torch.load(winner / "ckpt.pt", weights_only=True)["config"]["k"] == winner_k
        assert not (tmp_path / "run" / f"topk-k{6 - winner_k}-none").exists()  # the refused one wrote nothing
        steps = [json.loads(line)["step"] for line in (winner / "log.jsonl").read_text().splitlines()]
        assert steps == sorted(steps) and steps.count(10) == 1  # one run's log, not two interleaved
    elif case.startswith("two sae-extract"):
        cfg = ExtractConfig(model="timm:test_vit", random_init=True, model_kwargs={"img_size": 32}, limit=16,
                            images_per_shard=4, workers=0, progress=False, out=str(tmp_path / "x.zarr"))
        results = _race([lambda: extract(cfg)] * 2, tmp_path)
        assert sorted(code for code, _ in results) == [0, 2], results
        err = next(e for code, e in results if code == 2)
        assert "\n" not in err and ("being written by another sae-extract" in err or "already exists" in err), err
        open_store(tmp_path / "x.zarr").verify()
        assert not lock_path(tmp_path / "x.zarr").exists()  # released on exit
    elif case.startswith("sae-train killed"):
        args = ["--store", store, "--n-latents", 16, "--k", 2, "--batch-size", 16, "--steps", 100000,
                "--save-every", 20, "--no-progress", "--out", tmp_path / "run"]
        proc = _cli("visionsae.train.cli", *args)
        state = tmp_path / "run" / "trainer_state.pt"
        deadline = time.time() + 120
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert lock_path(tmp_path / "run").exists()  # left behind, but stale: nobody holds it
        saved = torch.load(state, weights_only=True)["step"]
        train(TrainConfig(store=str(store), n_latents=16, k=(2,), batch_size=16, steps=100000, save_every=20,
                          out=str(tmp_path / "run"), resume=True, stop_at_step=saved + 5, progress=False))
        assert torch.load(state, weights_only=True)["step"] == saved + 5
        assert not lock_path(tmp_path / "run").exists()
    else:  # pragma: no cover
        raise AssertionError(case)
